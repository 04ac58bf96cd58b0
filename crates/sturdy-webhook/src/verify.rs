//! Signature schemes. Every check runs on the raw body, before anything parses it, and compares
//! MACs in constant time.
//!
//! The cost of a verification does not grow with what the sender controls: each secret's MAC is
//! computed at most once per delivery, whatever the number of signature entries, and that MAC
//! is then compared (in constant time) with each entry; at most [`MAX_SIGNATURES`] entries are
//! considered.

use std::fmt;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::digest::generic_array::GenericArray;
use hmac::digest::CtOutput;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName};
use secrecy::{ExposeSecret, SecretSlice};
use sha2::{Digest, Sha256};
use sturdy_core::{Error, ErrorKind};

type HmacSha256 = Hmac<Sha256>;

/// The most signature entries considered in one header (Standard Webhooks' space-separated
/// `v1,...` entries, Stripe's `v1=...` entries): 16. Later entries are ignored, so a sender
/// that lists more cannot make a delivery cost more to check. Real senders list one or two (two
/// while a secret is being rotated).
pub const MAX_SIGNATURES: usize = 16;

/// The longest event id accepted from a sender: 256 bytes. A Standard Webhooks `webhook-id`
/// longer than this is refused (400); a longer Stripe `id` in the body is not used (the event is
/// deduplicated on a digest instead).
pub const MAX_ID_LEN: usize = 256;

/// The longest header value carried into [`Verified::headers`]: 1 KiB; a longer value is not
/// carried. At most 4 values of one header are carried.
const MAX_CARRIED_VALUE: usize = 1024;
const MAX_CARRIED_VALUES: usize = 4;

#[cfg(test)]
thread_local! {
    /// Bytes fed to SHA-256 (MACs and digests) by this thread: the work a verification did.
    static HASHED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

#[cfg_attr(not(test), allow(unused_variables))]
fn count_hashed(parts: &[&[u8]]) {
    #[cfg(test)]
    HASHED.with(|c| c.set(c.get() + parts.iter().map(|p| p.len() as u64).sum::<u64>()));
}

/// Why a delivery was refused. The caller sees only the status and a short generic text; the
/// reason goes to `tracing`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// 400 for missing or malformed headers, 401 for a bad signature or timestamp. One
    /// exception among the built-in verifiers: a Standard Webhooks `webhook-signature` header
    /// with no `v1` entry that decodes to 32 bytes is 401 (the scheme lets a sender add entries
    /// of other versions, which this receiver cannot check).
    pub status: http::StatusCode,
    /// What was wrong, for the logs. It never contains a secret.
    pub reason: String,
}

impl Rejection {
    /// A 400 rejection: headers missing or malformed.
    pub fn bad_request(reason: impl Into<String>) -> Self {
        Self {
            status: http::StatusCode::BAD_REQUEST,
            reason: reason.into(),
        }
    }

    /// A 401 rejection: the signature or the timestamp is wrong.
    pub fn unauthorized(reason: impl Into<String>) -> Self {
        Self {
            status: http::StatusCode::UNAUTHORIZED,
            reason: reason.into(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.reason, self.status)
    }
}

impl std::error::Error for Rejection {}

/// What a verified delivery says about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct Verified {
    /// The id to deduplicate on. It is always covered by the signature: the scheme's signed
    /// event id when it has one (Standard Webhooks' `webhook-id`, the `id` of a Stripe event),
    /// else `sha256:<hex>`, a digest of the signed content. `None` lets the receiver use a
    /// digest of the body.
    pub id: Option<String>,
    /// The signed timestamp (Unix seconds), when the scheme has one.
    pub timestamp: Option<i64>,
    /// Until when the verifier would accept this same delivery again: the signed timestamp plus
    /// the tolerance's whole seconds plus one second, since the schemes compare ages in whole
    /// seconds (a delivery 1.9 s old is "1 s old"). With a tolerance too long to add to a time
    /// (`Duration::MAX`: the age check turned off), the verifier accepts the delivery at any
    /// time, and this is the latest time a `SystemTime` can hold. The receiver remembers its id
    /// at least that long, whatever its deduplication TTL, up to the longest its queue keeps a
    /// key (about 30 years in Redis; in memory, as long as the clock can count, or 100 years
    /// when it cannot, and always within the queue's bound on keys). `None` for schemes that
    /// sign no timestamp.
    pub fresh_until: Option<SystemTime>,
    /// The headers the scheme defines, copied from the request (values up to 1 KiB, at most 4
    /// per name). Only what the scheme signs is verified: see each scheme.
    pub headers: HeaderMap,
}

impl Verified {
    /// Nothing known yet: no id, no timestamp, no headers.
    pub fn new() -> Self {
        Self::default()
    }

    /// The id to deduplicate on; it must be covered by the signature.
    #[must_use]
    pub fn with_id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// The signed timestamp (Unix seconds) and how long such a delivery stays acceptable; sets
    /// [`fresh_until`](Self::fresh_until) to cover every instant an age check in whole seconds
    /// accepts.
    #[must_use]
    pub fn with_timestamp(mut self, timestamp: i64, tolerance: Duration) -> Self {
        self.timestamp = Some(timestamp);
        // A tolerance too long to add to a time (`Duration::MAX`) accepts the delivery at any
        // age: it stays fresh until the latest time there is (a bound of 30 years from the
        // signed time would be over already for an old timestamp, and its copy let in after the
        // dedup TTL). `None` would mean "no timestamp". A timestamp that cannot be a
        // `SystemTime` (before 1970) counts from 1970.
        let window =
            Duration::from_secs(tolerance.as_secs()).saturating_add(Duration::from_secs(1));
        let signed = u64::try_from(timestamp)
            .ok()
            .and_then(|t| SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(t)))
            .unwrap_or(SystemTime::UNIX_EPOCH);
        self.fresh_until = Some(signed.checked_add(window).unwrap_or_else(latest_time));
        self
    }

    /// The headers to carry with the event.
    #[must_use]
    pub fn with_headers(mut self, headers: HeaderMap) -> Self {
        self.headers = headers;
        self
    }
}

/// The latest time a `SystemTime` can hold (its range depends on the platform). Found once,
/// greedily from the largest steps that still fit (about 190 tries), not for every delivery.
fn latest_time() -> SystemTime {
    static LATEST: std::sync::OnceLock<SystemTime> = std::sync::OnceLock::new();
    *LATEST.get_or_init(|| {
        let mut t = SystemTime::UNIX_EPOCH;
        let mut step = Duration::MAX;
        while !step.is_zero() {
            match t.checked_add(step) {
                Some(later) => t = later,
                None => step /= 2,
            }
        }
        t
    })
}

/// A signature scheme.
///
/// The receiver calls [`Verifier::check_headers`] before it reads the body, and
/// [`Verifier::verify`] once the body is read; a body larger than the receiver's offload
/// threshold is verified on tokio's blocking pool.
pub trait Verifier: Send + Sync + fmt::Debug + 'static {
    /// The scheme's name (`standard`, `stripe`, `github`, or the generic scheme's name): the
    /// default route name of a receiver, and part of its deduplication namespace.
    fn scheme(&self) -> &'static str;

    /// Checks, before the body is read, that the headers the scheme needs are present and
    /// well-formed and that the signed timestamp (if any) is fresh. The default accepts
    /// everything.
    ///
    /// # Errors
    /// A [`Rejection`] saying why.
    fn check_headers(&self, headers: &HeaderMap, now: SystemTime) -> Result<(), Rejection> {
        let _ = (headers, now);
        Ok(())
    }

    /// Verifies a delivery against its raw body at wall-clock time `now`.
    ///
    /// # Errors
    /// A [`Rejection`] saying why.
    fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> Result<Verified, Rejection>;
}

/// Secrets, several at once for rotation; `Debug` never shows them.
#[derive(Clone)]
struct Keys(Vec<SecretSlice<u8>>);

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[{} secret(s), redacted]", self.0.len())
    }
}

fn config(msg: &str) -> Error {
    Error::new(ErrorKind::Config, msg.to_owned())
}

impl Keys {
    /// Keys that are the secrets' bytes as they are (Stripe, GitHub, generic). Empty secrets and
    /// an empty list are refused: anyone could sign with an empty key.
    fn raw<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Result<Self, Error> {
        let mut keys = Vec::new();
        for s in secrets {
            if s.is_empty() {
                return Err(config(
                    "the webhook secret is empty: anyone could sign with it; set the secret the sender was configured with",
                ));
            }
            keys.push(SecretSlice::from(s.as_bytes().to_vec()));
        }
        if keys.is_empty() {
            return Err(config("at least one webhook secret is needed"));
        }
        Ok(Self(keys))
    }

    fn mac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
        count_hashed(parts);
        let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
        for p in parts {
            m.update(p);
        }
        m
    }

    /// Whether any key's MAC over `parts` equals one of `tags`. Each key's MAC is computed once
    /// and compared with every tag in constant time.
    fn matches(&self, parts: &[&[u8]], tags: &[Vec<u8>]) -> bool {
        self.0.iter().any(|k| {
            let expected = Self::mac(k.expose_secret(), parts).finalize();
            tags.iter().any(|t| {
                t.len() == MAC_LEN
                    && CtOutput::<HmacSha256>::from(GenericArray::from_slice(t)) == expected
            })
        })
    }
}

/// The length of an HMAC-SHA256 tag.
const MAC_LEN: usize = 32;

/// `sha256:<hex>` of the concatenated parts: an id covered by the signature for schemes whose
/// signed content has no id.
fn digest_id(parts: &[&[u8]]) -> String {
    count_hashed(parts);
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    format!("sha256:{}", hex_encode(&h.finalize()))
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, Rejection> {
    let v = headers
        .get(name)
        .ok_or_else(|| Rejection::bad_request(format!("missing {name} header")))?;
    v.to_str()
        .map_err(|_| Rejection::bad_request(format!("{name} header is not visible ASCII")))
}

/// Copies the named headers, bounded (see [`Verified::headers`]).
fn carry<'a>(headers: &HeaderMap, names: impl IntoIterator<Item = &'a HeaderName>) -> HeaderMap {
    let mut out = HeaderMap::new();
    for name in names {
        for v in headers
            .get_all(name)
            .iter()
            .filter(|v| v.len() <= MAX_CARRIED_VALUE)
            .take(MAX_CARRIED_VALUES)
        {
            out.append(name.clone(), v.clone());
        }
    }
    out
}

fn check_time(ts: i64, now: SystemTime, tolerance: Duration) -> Result<(), Rejection> {
    let now = match now.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        // A clock before 1970 (one set by hand) reads as negative seconds, as signers write them.
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    };
    let tol = i64::try_from(tolerance.as_secs()).unwrap_or(i64::MAX);
    if now.saturating_sub(ts) > tol {
        return Err(Rejection::unauthorized(format!(
            "timestamp {ts} is more than {tol} s old"
        )));
    }
    if ts.saturating_sub(now) > tol {
        return Err(Rejection::unauthorized(format!(
            "timestamp {ts} is more than {tol} s in the future"
        )));
    }
    Ok(())
}

fn parse_ts(s: &str) -> Result<i64, Rejection> {
    let s = s.trim();
    // A whole number of seconds, negative ones included: a signed time before 1970 is well
    // formed and stale (401), as the signers' own verifiers read it, not malformed (400).
    let digits = s.strip_prefix('-').unwrap_or(s);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Rejection::bad_request(
            "the timestamp is not a whole number of seconds",
        ));
    }
    s.parse()
        .map_err(|_| Rejection::bad_request("the timestamp is out of range"))
}

pub(crate) fn hex_encode(b: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push(char::from(HEX[usize::from(x >> 4)]));
        s.push(char::from(HEX[usize::from(x & 0xf)]));
    }
    s
}

/// Strict hex (either case, no sign, no whitespace).
fn hex_decode(s: &str) -> Option<Vec<u8>> {
    fn nibble(c: u8) -> Option<u8> {
        match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            b'A'..=b'F' => Some(c - b'A' + 10),
            _ => None,
        }
    }
    let b = s.as_bytes();
    if !b.len().is_multiple_of(2) {
        return None;
    }
    b.chunks_exact(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect()
}

/// Standard base64 that also accepts missing padding (as some reference libraries do).
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new()
        .with_decode_padding_mode(DecodePaddingMode::Indifferent)
        .with_decode_allow_trailing_bits(true),
);

/// The default timestamp tolerance: 5 minutes, both directions.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

// ===== Standard Webhooks =====

/// [Standard Webhooks](https://www.standardwebhooks.com/): `webhook-id`, `webhook-timestamp`,
/// `webhook-signature: v1,<base64>` (several, space-separated; the first [`MAX_SIGNATURES`]
/// `v1` entries are considered), signing `id.timestamp.body` with the base64 key of a `whsec_`
/// secret.
///
/// The id and the timestamp are signed: the event is deduplicated on `webhook-id`, and the
/// event carries the `webhook-id` and `webhook-timestamp` headers. A `webhook-id` that is empty,
/// longer than [`MAX_ID_LEN`], not ASCII (a header value the `http` crate's `to_str` refuses,
/// such as `msg_café`; spaces and tabs inside are ASCII and kept, as signed), or holding a `.`
/// (which would let one signed delivery be cut into another id and body), is refused.
#[derive(Debug, Clone)]
pub struct StandardWebhooks {
    keys: Keys,
    tolerance: Duration,
}

/// Decodes a Standard Webhooks secret: `whsec_` prefix optional, base64 with or without padding.
///
/// # Errors
/// When the secret is empty or not base64.
pub fn decode_standard_secret(secret: &str) -> Result<Vec<u8>, Error> {
    let b64 = secret.strip_prefix("whsec_").unwrap_or(secret);
    if b64.is_empty() {
        return Err(config("the webhook secret is empty"));
    }
    LENIENT
        .decode(b64)
        .map_err(|_| config("the webhook secret is not base64 (expected whsec_<base64>)"))
}

struct StandardParts<'a> {
    id: &'a str,
    ts_raw: &'a str,
    ts: i64,
    tags: Vec<Vec<u8>>,
}

const STANDARD_HEADERS: [HeaderName; 2] = [
    HeaderName::from_static("webhook-id"),
    HeaderName::from_static("webhook-timestamp"),
];

impl StandardWebhooks {
    /// Verifies with `secret` (`whsec_...`).
    ///
    /// # Errors
    /// When the secret is empty or not base64.
    pub fn new(secret: &str) -> Result<Self, Error> {
        Self::with_secrets([secret])
    }

    /// Verifies with any of `secrets` (rotation: old and new both accepted).
    ///
    /// # Errors
    /// When a secret is empty or not base64, or none is given.
    pub fn with_secrets<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Result<Self, Error> {
        let keys = secrets
            .into_iter()
            .map(|s| decode_standard_secret(s).map(SecretSlice::from))
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(config("at least one webhook secret is needed"));
        }
        Ok(Self {
            keys: Keys(keys),
            tolerance: DEFAULT_TOLERANCE,
        })
    }

    /// The timestamp tolerance, both directions \[5 min\].
    #[must_use]
    pub fn with_tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    fn parse<'a>(
        &self,
        headers: &'a HeaderMap,
        now: SystemTime,
    ) -> Result<StandardParts<'a>, Rejection> {
        let id = header(headers, "webhook-id")?;
        if id.is_empty() || id.len() > MAX_ID_LEN {
            return Err(Rejection::bad_request(format!(
                "webhook-id is empty or longer than {MAX_ID_LEN} bytes"
            )));
        }
        // The signed bytes are `id.timestamp.body`: an id with a `.` could be cut elsewhere
        // (`msg.<ts>` + `<ts>` + `B` signs the same bytes as `msg` + `<ts>` + `<ts>.B`), so one
        // signed delivery could be replayed as another event under another id. The spec asks
        // that ids never hold a `.`.
        if id.contains('.') {
            return Err(Rejection::bad_request("webhook-id contains a '.'"));
        }
        let ts_raw = header(headers, "webhook-timestamp")?.trim();
        let sigs = header(headers, "webhook-signature")?;
        let ts = parse_ts(ts_raw)?;
        check_time(ts, now, self.tolerance)?;
        // Entries that are not `v1,<base64>` are skipped, not errors (other versions, rotation);
        // so is a v1 entry that is not 32 bytes, which no HMAC-SHA256 can match (`v1,` alone
        // decodes to nothing): a header of such entries only is refused before the body.
        let tags: Vec<Vec<u8>> = sigs
            .split(' ')
            .filter_map(|e| e.split_once(','))
            .filter(|(v, _)| *v == "v1")
            .take(MAX_SIGNATURES)
            .filter_map(|(_, s)| STANDARD.decode(s).ok())
            .filter(|tag| tag.len() == MAC_LEN)
            .collect();
        if tags.is_empty() {
            return Err(Rejection::unauthorized(
                "webhook-signature has no v1 entry that decodes to a 32-byte signature",
            ));
        }
        Ok(StandardParts {
            id,
            ts_raw,
            ts,
            tags,
        })
    }
}

impl Verifier for StandardWebhooks {
    fn scheme(&self) -> &'static str {
        "standard"
    }

    fn check_headers(&self, headers: &HeaderMap, now: SystemTime) -> Result<(), Rejection> {
        self.parse(headers, now).map(|_| ())
    }

    fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> Result<Verified, Rejection> {
        let p = self.parse(headers, now)?;
        let parts: [&[u8]; 5] = [p.id.as_bytes(), b".", p.ts_raw.as_bytes(), b".", body];
        if !self.keys.matches(&parts, &p.tags) {
            return Err(Rejection::unauthorized(format!(
                "none of the first {} v1 entries of webhook-signature matches",
                p.tags.len()
            )));
        }
        Ok(Verified::new()
            .with_id(p.id)
            .with_timestamp(p.ts, self.tolerance)
            .with_headers(carry(headers, &STANDARD_HEADERS)))
    }
}

/// Signs a payload the Standard Webhooks way, for senders and tests: the `webhook-signature`
/// value `v1,<base64>`.
///
/// # Errors
/// When the secret is empty or not base64.
pub fn sign_standard(secret: &str, id: &str, timestamp: i64, body: &[u8]) -> Result<String, Error> {
    let key = decode_standard_secret(secret)?;
    let ts = timestamp.to_string();
    let tag = Keys::mac(&key, &[id.as_bytes(), b".", ts.as_bytes(), b".", body])
        .finalize()
        .into_bytes();
    Ok(format!("v1,{}", STANDARD.encode(tag)))
}

// ===== Stripe =====

/// Stripe: `Stripe-Signature: t=<unix>,v1=<hex>\[,v1=...\]` (the first [`MAX_SIGNATURES`] `v1`
/// entries are considered), signing `t.body` with the secret's bytes as they are (a `whsec_`
/// Stripe secret is *not* base64-decoded).
///
/// The event is deduplicated on the `id` of the verified body (so Stripe's own retries, which
/// are signed again with a new timestamp, are recognised); a body without a usable `id` is
/// deduplicated on a digest of the signed `t.body`. The event carries the `Stripe-Signature`
/// header.
#[derive(Debug, Clone)]
pub struct Stripe {
    keys: Keys,
    tolerance: Duration,
}

struct StripeParts<'a> {
    ts_raw: &'a str,
    ts: i64,
    tags: Vec<Vec<u8>>,
}

const STRIPE_HEADERS: [HeaderName; 1] = [HeaderName::from_static("stripe-signature")];

/// The one field of a Stripe event read here; everything else is skipped without being kept.
#[derive(serde::Deserialize)]
struct StripeEnvelope<'a> {
    #[serde(borrow, default)]
    id: Option<std::borrow::Cow<'a, str>>,
}

impl Stripe {
    /// Verifies with `secret`.
    ///
    /// # Errors
    /// When the secret is empty.
    pub fn new(secret: &str) -> Result<Self, Error> {
        Self::with_secrets([secret])
    }

    /// Verifies with any of `secrets` (rotation).
    ///
    /// # Errors
    /// When a secret is empty, or none is given.
    pub fn with_secrets<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Result<Self, Error> {
        Ok(Self {
            keys: Keys::raw(secrets)?,
            tolerance: DEFAULT_TOLERANCE,
        })
    }

    /// The timestamp tolerance, both directions \[5 min\].
    #[must_use]
    pub fn with_tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    fn parse<'a>(
        &self,
        headers: &'a HeaderMap,
        now: SystemTime,
    ) -> Result<StripeParts<'a>, Rejection> {
        let raw = header(headers, "stripe-signature")?;
        let mut ts: Option<(&str, i64)> = None;
        let mut tags: Vec<Vec<u8>> = Vec::new();
        let mut v1_seen = 0usize;
        for pair in raw.split(',') {
            let mut kv = pair.split('=');
            let (Some(k), Some(v), None) = (kv.next(), kv.next(), kv.next()) else {
                return Err(Rejection::bad_request(
                    "Stripe-Signature is not a list of key=value pairs",
                ));
            };
            match k.trim() {
                "t" => ts = Some((v.trim(), parse_ts(v)?)),
                "v1" => {
                    v1_seen += 1;
                    // An undecodable v1 entry is ignored, as Stripe's libraries do; so is one that
                    // is not 32 bytes (64 hex digits), which no HMAC-SHA256 can match.
                    if v1_seen <= MAX_SIGNATURES {
                        tags.extend(hex_decode(v.trim()).filter(|tag| tag.len() == MAC_LEN));
                    }
                }
                _ => {}
            }
        }
        let (ts_raw, ts) =
            ts.ok_or_else(|| Rejection::bad_request("Stripe-Signature has no timestamp"))?;
        if tags.is_empty() {
            return Err(Rejection::bad_request(
                "Stripe-Signature has no v1 signature of 64 hex digits",
            ));
        }
        check_time(ts, now, self.tolerance)?;
        Ok(StripeParts { ts_raw, ts, tags })
    }
}

impl Verifier for Stripe {
    fn scheme(&self) -> &'static str {
        "stripe"
    }

    fn check_headers(&self, headers: &HeaderMap, now: SystemTime) -> Result<(), Rejection> {
        self.parse(headers, now).map(|_| ())
    }

    fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> Result<Verified, Rejection> {
        let p = self.parse(headers, now)?;
        let parts: [&[u8]; 3] = [p.ts_raw.as_bytes(), b".", body];
        if !self.keys.matches(&parts, &p.tags) {
            return Err(Rejection::unauthorized(format!(
                "none of the first {} Stripe v1 signatures matches",
                p.tags.len()
            )));
        }
        let id = serde_json::from_slice::<StripeEnvelope<'_>>(body)
            .ok()
            .and_then(|e| e.id)
            .filter(|id| !id.is_empty() && id.len() <= MAX_ID_LEN)
            .map_or_else(|| digest_id(&parts), std::borrow::Cow::into_owned);
        Ok(Verified::new()
            .with_id(id)
            .with_timestamp(p.ts, self.tolerance)
            .with_headers(carry(headers, &STRIPE_HEADERS)))
    }
}

/// Signs a payload the Stripe way: the `Stripe-Signature` value `t=<ts>,v1=<hex>`.
pub fn sign_stripe(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let ts = timestamp.to_string();
    let tag = Keys::mac(secret.as_bytes(), &[ts.as_bytes(), b".", body])
        .finalize()
        .into_bytes();
    format!("t={ts},v1={}", hex_encode(&tag))
}

// ===== GitHub =====

/// GitHub: `X-Hub-Signature-256: sha256=<hex>` over the body, keyed with the secret's bytes.
///
/// GitHub signs the body only: no header, no timestamp. The `X-GitHub-Delivery` id is *not*
/// signed, so anyone holding a copy of a delivery could resend it under a new id; the event is
/// therefore deduplicated on a digest of the body (`sha256:<hex>`), which the signature covers.
/// GitHub's own redeliveries carry the same body, so they are recognised as duplicates too. As
/// nothing signed dates a delivery, a copy is refused only while its digest is remembered (the
/// receiver's deduplication TTL \[24 h\]); a source allowlist
/// (`WebhookReceiver::with_source_allowlist`) narrows who can try.
///
/// The event carries `X-GitHub-Event`, `X-GitHub-Delivery`, `X-GitHub-Hook-ID`,
/// `X-GitHub-Hook-Installation-Target-ID` and `X-GitHub-Hook-Installation-Target-Type`: what
/// GitHub sent, not verified.
#[derive(Debug, Clone)]
pub struct GitHub {
    keys: Keys,
}

const GITHUB_HEADERS: [HeaderName; 5] = [
    HeaderName::from_static("x-github-event"),
    HeaderName::from_static("x-github-delivery"),
    HeaderName::from_static("x-github-hook-id"),
    HeaderName::from_static("x-github-hook-installation-target-id"),
    HeaderName::from_static("x-github-hook-installation-target-type"),
];

impl GitHub {
    /// Verifies with `secret`.
    ///
    /// # Errors
    /// When the secret is empty.
    pub fn new(secret: &str) -> Result<Self, Error> {
        Self::with_secrets([secret])
    }

    /// Verifies with any of `secrets` (rotation).
    ///
    /// # Errors
    /// When a secret is empty, or none is given.
    pub fn with_secrets<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Result<Self, Error> {
        Ok(Self {
            keys: Keys::raw(secrets)?,
        })
    }

    fn parse(headers: &HeaderMap) -> Result<Vec<u8>, Rejection> {
        let raw = header(headers, "x-hub-signature-256")?;
        let hex = raw.trim().strip_prefix("sha256=").ok_or_else(|| {
            Rejection::bad_request("X-Hub-Signature-256 does not start with sha256=")
        })?;
        hex_decode(hex)
            .filter(|tag| tag.len() == MAC_LEN)
            .ok_or_else(|| Rejection::bad_request("X-Hub-Signature-256 is not 64 hex digits"))
    }
}

impl Verifier for GitHub {
    fn scheme(&self) -> &'static str {
        "github"
    }

    fn check_headers(&self, headers: &HeaderMap, _now: SystemTime) -> Result<(), Rejection> {
        Self::parse(headers).map(|_| ())
    }

    fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        _now: SystemTime,
    ) -> Result<Verified, Rejection> {
        let tag = Self::parse(headers)?;
        if !self.keys.matches(&[body], std::slice::from_ref(&tag)) {
            return Err(Rejection::unauthorized(
                "X-Hub-Signature-256 does not match",
            ));
        }
        Ok(Verified::new()
            .with_id(digest_id(&[body]))
            .with_headers(carry(headers, &GITHUB_HEADERS)))
    }
}

/// Signs a payload the GitHub way: the `X-Hub-Signature-256` value `sha256=<hex>`.
pub fn sign_github(secret: &str, body: &[u8]) -> String {
    format!(
        "sha256={}",
        hex_encode(
            &Keys::mac(secret.as_bytes(), &[body])
                .finalize()
                .into_bytes()
        )
    )
}

// ===== Generic HMAC-SHA256 =====

/// How a generic signature is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Lowercase or uppercase hex.
    Hex,
    /// Standard base64.
    Base64,
}

/// A configurable HMAC-SHA256 scheme: the signature header and its prefix, hex or base64, and
/// what is signed (the body, or `timestamp.body` with a timestamp header).
///
/// Such a scheme signs no event id, so the event is deduplicated on a digest (`sha256:<hex>`)
/// of the signed content: a copy of a delivery is a duplicate whatever unsigned headers say.
/// Headers named with [`GenericHmac::with_event_header`] (for example the sender's unsigned
/// event id or type) are carried with the event, not verified.
#[derive(Debug, Clone)]
pub struct GenericHmac {
    name: &'static str,
    keys: Keys,
    header: HeaderName,
    prefix: String,
    encoding: Encoding,
    timestamp_header: Option<HeaderName>,
    event_headers: Vec<HeaderName>,
    tolerance: Duration,
}

impl GenericHmac {
    /// Scheme `name`, signatures in `header`, hex-encoded, over the body, keyed with the
    /// secret's bytes.
    ///
    /// # Errors
    /// When the name or the secret is empty.
    pub fn new(name: &'static str, header: HeaderName, secret: &str) -> Result<Self, Error> {
        Self::with_secrets(name, header, [secret])
    }

    /// Like [`GenericHmac::new`], accepting any of `secrets` (rotation).
    ///
    /// # Errors
    /// When the name or a secret is empty, or no secret is given.
    pub fn with_secrets<'a>(
        name: &'static str,
        header: HeaderName,
        secrets: impl IntoIterator<Item = &'a str>,
    ) -> Result<Self, Error> {
        if name.is_empty() {
            return Err(config("the generic webhook scheme needs a name"));
        }
        Ok(Self {
            name,
            keys: Keys::raw(secrets)?,
            header,
            prefix: String::new(),
            encoding: Encoding::Hex,
            timestamp_header: None,
            event_headers: Vec::new(),
            tolerance: DEFAULT_TOLERANCE,
        })
    }

    /// The signature value starts with `prefix` (e.g. `sha256=`) \[none\].
    #[must_use]
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The signature's encoding \[hex\].
    #[must_use]
    pub fn with_encoding(mut self, encoding: Encoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// Signs `timestamp.body`, the timestamp (Unix seconds) in `header`, checked against the
    /// tolerance \[no timestamp: the body alone is signed\].
    #[must_use]
    pub fn with_timestamp_header(mut self, header: HeaderName) -> Self {
        self.timestamp_header = Some(header);
        self
    }

    /// Carries `header` with the event (unverified; see the type's docs). The timestamp header
    /// is carried without being named.
    #[must_use]
    pub fn with_event_header(mut self, header: HeaderName) -> Self {
        self.event_headers.push(header);
        self
    }

    /// The timestamp tolerance, both directions \[5 min\].
    #[must_use]
    pub fn with_tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }

    /// The tag, and the timestamp's raw text and value.
    fn parse<'a>(
        &self,
        headers: &'a HeaderMap,
        now: SystemTime,
    ) -> Result<(Vec<u8>, Option<(&'a str, i64)>), Rejection> {
        let raw = header(headers, self.header.as_str())?;
        let enc = raw
            .trim()
            .strip_prefix(self.prefix.as_str())
            .ok_or_else(|| {
                Rejection::bad_request(format!(
                    "{} does not start with {:?}",
                    self.header, self.prefix
                ))
            })?;
        let tag = match self.encoding {
            Encoding::Hex => hex_decode(enc),
            Encoding::Base64 => STANDARD.decode(enc).ok(),
        }
        .filter(|tag| tag.len() == MAC_LEN)
        .ok_or_else(|| {
            Rejection::bad_request(format!(
                "{} is not a 32-byte signature in {:?}",
                self.header, self.encoding
            ))
        })?;
        let ts = match &self.timestamp_header {
            Some(h) => {
                let ts_raw = header(headers, h.as_str())?.trim();
                let ts = parse_ts(ts_raw)?;
                check_time(ts, now, self.tolerance)?;
                Some((ts_raw, ts))
            }
            None => None,
        };
        Ok((tag, ts))
    }
}

impl Verifier for GenericHmac {
    fn scheme(&self) -> &'static str {
        self.name
    }

    fn check_headers(&self, headers: &HeaderMap, now: SystemTime) -> Result<(), Rejection> {
        self.parse(headers, now).map(|_| ())
    }

    fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> Result<Verified, Rejection> {
        let (tag, ts) = self.parse(headers, now)?;
        let ts_raw = ts.map_or(&b""[..], |(raw, _)| raw.as_bytes());
        let with_ts: [&[u8]; 3] = [ts_raw, b".", body];
        let parts: &[&[u8]] = if ts.is_some() { &with_ts } else { &[body] };
        if !self.keys.matches(parts, std::slice::from_ref(&tag)) {
            return Err(Rejection::unauthorized(format!(
                "{} does not match",
                self.header
            )));
        }
        let id = digest_id(parts);
        let carried = carry(
            headers,
            self.event_headers.iter().chain(&self.timestamp_header),
        );
        let mut v = Verified::new().with_id(id).with_headers(carried);
        if let Some((_, ts)) = ts {
            v = v.with_timestamp(ts, self.tolerance);
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    //! The work a verification does, counted in bytes hashed: it does not grow with the number
    //! of signature entries a sender puts in a header.

    use super::*;
    use http::HeaderValue;

    const MIB: usize = 1024 * 1024;
    const NOW: u64 = 1_700_000_000;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn a_clock_before_1970_reads_negative_seconds() {
        let tol = Duration::from_secs(300);
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(1_000_000);
        assert!(check_time(-1_000_000, before, tol).is_ok());
        assert!(check_time(-1_000_000 + 300, before, tol).is_ok());
        assert!(check_time(-1_000_000 + 301, before, tol).is_err());
        assert!(check_time(0, before, tol).is_err());
        assert!(check_time(i64::MIN, before, tol).is_err());
        assert!(check_time(i64::MAX, before, tol).is_err());
    }

    /// Runs `f` and returns the bytes it hashed on this thread.
    fn hashed(f: impl FnOnce()) -> u64 {
        let before = HASHED.with(std::cell::Cell::get);
        f();
        HASHED.with(std::cell::Cell::get) - before
    }

    fn headers(pairs: &[(&str, String)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const SECRETS: [&str; 3] = [
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "whsec_BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB",
    ];

    fn standard(sig: &str) -> HeaderMap {
        headers(&[
            ("webhook-id", "msg_1".into()),
            ("webhook-timestamp", NOW.to_string()),
            ("webhook-signature", sig.into()),
        ])
    }

    #[test]
    fn standard_work_does_not_grow_with_the_number_of_entries() {
        let body = vec![b'x'; MIB];
        let v = StandardWebhooks::with_secrets(SECRETS).unwrap();
        let wrong = sign_standard(
            "whsec_CCCCCCCCCCCCCCCCCCCCCCCCCCCCCCCC",
            "msg_1",
            NOW as i64,
            &body,
        )
        .unwrap();
        let one = hashed(|| {
            assert!(v.verify(&standard(&wrong), &body, at(NOW)).is_err());
        });
        let many = vec![wrong.as_str(); 8_000].join(" ");
        let worst = hashed(|| {
            assert!(v.verify(&standard(&many), &body, at(NOW)).is_err());
        });
        let signed = (MIB + "msg_1..".len() + NOW.to_string().len()) as u64;
        // One MAC per secret, whatever the number of entries.
        assert_eq!(one, 3 * signed);
        assert_eq!(worst, one);
        // The headers alone are checked without hashing anything.
        assert_eq!(
            hashed(|| v.check_headers(&standard(&many), at(NOW)).unwrap()),
            0
        );
    }

    #[test]
    fn stripe_work_does_not_grow_with_the_number_of_entries() {
        let body = vec![b'x'; MIB];
        let v = Stripe::with_secrets(["k1", "k2", "k3"]).unwrap();
        let wrong = sign_stripe("k4", NOW as i64, &body);
        let h = |s: String| headers(&[("stripe-signature", s)]);
        let one = hashed(|| assert!(v.verify(&h(wrong.clone()), &body, at(NOW)).is_err()));
        let entry = wrong.split_once(',').unwrap().1;
        let many = format!("t={NOW},{}", vec![entry; 8_000].join(","));
        let worst = hashed(|| assert!(v.verify(&h(many), &body, at(NOW)).is_err()));
        assert_eq!(one, 3 * (MIB as u64 + 11));
        assert_eq!(worst, one);
    }

    #[test]
    fn only_the_first_max_signatures_entries_are_considered() {
        let body = b"{}";
        let v = StandardWebhooks::new(SECRETS[0]).unwrap();
        let good = sign_standard(SECRETS[0], "msg_1", NOW as i64, body).unwrap();
        let bad = sign_standard(SECRETS[1], "msg_1", NOW as i64, body).unwrap();
        let mut entries = vec![bad.as_str(); MAX_SIGNATURES - 1];
        entries.push(&good);
        assert!(v
            .verify(&standard(&entries.join(" ")), body, at(NOW))
            .is_ok());
        entries.insert(0, &bad);
        let r = v
            .verify(&standard(&entries.join(" ")), body, at(NOW))
            .unwrap_err();
        assert_eq!(r.status, http::StatusCode::UNAUTHORIZED);

        let s = Stripe::new("k").unwrap();
        let good = sign_stripe("k", NOW as i64, body);
        let bad = sign_stripe("other", NOW as i64, body);
        let bad_entry = bad.split_once(',').unwrap().1;
        let good_entry = good.split_once(',').unwrap().1;
        let list = |n: usize| {
            let mut e = vec![bad_entry; n];
            e.push(good_entry);
            headers(&[("stripe-signature", format!("t={NOW},{}", e.join(",")))])
        };
        assert!(s.verify(&list(MAX_SIGNATURES - 1), body, at(NOW)).is_ok());
        assert!(s.verify(&list(MAX_SIGNATURES), body, at(NOW)).is_err());
    }

    #[test]
    fn a_matching_first_secret_stops_the_work() {
        let body = vec![b'x'; 4096];
        let v = GitHub::with_secrets(["a", "b", "c"]).unwrap();
        let h = headers(&[("x-hub-signature-256", sign_github("a", &body))]);
        // One MAC, then the digest the event is deduplicated on.
        assert_eq!(
            hashed(|| {
                v.verify(&h, &body, at(NOW)).unwrap();
            }),
            2 * 4096
        );
    }

    #[test]
    fn hex_is_strict() {
        assert_eq!(hex_decode("0aFf"), Some(vec![0x0a, 0xff]));
        for bad in ["+f", "0", "0g", " 0a", "éé"] {
            assert_eq!(hex_decode(bad), None, "{bad}");
        }
        assert_eq!(hex_encode(&[0, 0xab, 0xff]), "00abff");
    }
}
