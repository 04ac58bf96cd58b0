//! Signature schemes. Every check runs on the raw body, before anything parses it, and compares
//! MACs in constant time (`hmac`'s `verify_slice`).

use std::fmt;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName};
use secrecy::{ExposeSecret, SecretSlice};
use sha2::Sha256;
use sturdy_core::{Error, ErrorKind};

type HmacSha256 = Hmac<Sha256>;

/// Why a delivery was refused. The caller sees only the status and "invalid signature"; the
/// reason goes to `tracing`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// 400 for missing or malformed headers, 401 for a bad signature or timestamp.
    pub status: http::StatusCode,
    /// What was wrong, for the logs.
    pub reason: String,
}

impl Rejection {
    fn bad_request(reason: impl Into<String>) -> Self {
        Self {
            status: http::StatusCode::BAD_REQUEST,
            reason: reason.into(),
        }
    }

    fn unauthorized(reason: impl Into<String>) -> Self {
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The scheme's name (`standard`, `stripe`, `github`, or the generic scheme's name).
    pub scheme: &'static str,
    /// The event id for deduplication, when the scheme has one.
    pub id: Option<String>,
    /// The signed timestamp (Unix seconds), when the scheme has one.
    pub timestamp: Option<i64>,
}

/// A signature scheme.
pub trait Verifier: Send + Sync + fmt::Debug + 'static {
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

impl Keys {
    /// Keys that are the secrets' bytes as they are (Stripe, GitHub, generic).
    fn raw<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        Self(
            secrets
                .into_iter()
                .map(|s| SecretSlice::from(s.as_bytes().to_vec()))
                .collect(),
        )
    }

    fn mac(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
        let mut m = HmacSha256::new_from_slice(key).expect("HMAC takes keys of any length");
        for p in parts {
            m.update(p);
        }
        m
    }

    /// Whether any key's MAC over `parts` equals `tag` (constant time per comparison).
    fn matches(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.0.iter().any(|k| {
            Self::mac(k.expose_secret(), parts)
                .verify_slice(tag)
                .is_ok()
        })
    }
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, Rejection> {
    let v = headers
        .get(name)
        .ok_or_else(|| Rejection::bad_request(format!("missing {name} header")))?;
    v.to_str()
        .map_err(|_| Rejection::bad_request(format!("{name} header is not visible ASCII")))
}

fn check_time(ts: i64, now: SystemTime, tolerance: Duration) -> Result<(), Rejection> {
    let now = match now.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(_) => 0,
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
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Rejection::bad_request(
            "the timestamp is not a whole number of seconds",
        ));
    }
    s.parse()
        .map_err(|_| Rejection::bad_request("the timestamp is out of range"))
}

pub(crate) fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
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
/// `webhook-signature: v1,<base64>` (several, space-separated), signing `id.timestamp.body` with
/// the base64 key of a `whsec_` secret.
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
        return Err(Error::new(ErrorKind::Config, "the webhook secret is empty"));
    }
    LENIENT.decode(b64).map_err(|_| {
        Error::new(
            ErrorKind::Config,
            "the webhook secret is not base64 (expected whsec_<base64>)",
        )
    })
}

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
            return Err(Error::new(
                ErrorKind::Config,
                "at least one webhook secret is needed",
            ));
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
}

impl Verifier for StandardWebhooks {
    fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> Result<Verified, Rejection> {
        let id = header(headers, "webhook-id")?;
        let ts_raw = header(headers, "webhook-timestamp")?;
        let sigs = header(headers, "webhook-signature")?;
        let ts = parse_ts(ts_raw)?;
        check_time(ts, now, self.tolerance)?;
        let parts: [&[u8]; 5] = [id.as_bytes(), b".", ts_raw.trim().as_bytes(), b".", body];
        // Entries that are not `v1,<base64>` are skipped, not errors (other versions, rotation).
        let ok = sigs
            .split(' ')
            .filter_map(|e| e.split_once(','))
            .filter(|(v, _)| *v == "v1")
            .filter_map(|(_, s)| STANDARD.decode(s).ok())
            .any(|tag| self.keys.matches(&parts, &tag));
        if !ok {
            return Err(Rejection::unauthorized(
                "no webhook-signature entry matches",
            ));
        }
        Ok(Verified {
            scheme: "standard",
            id: Some(id.to_owned()),
            timestamp: Some(ts),
        })
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

/// Stripe: `Stripe-Signature: t=<unix>,v1=<hex>\[,v1=...\]`, signing `t.body` with the secret's
/// bytes as they are (a `whsec_` Stripe secret is *not* base64-decoded). The event id comes from
/// the verified body's `id`.
#[derive(Debug, Clone)]
pub struct Stripe {
    keys: Keys,
    tolerance: Duration,
}

impl Stripe {
    /// Verifies with `secret`.
    pub fn new(secret: &str) -> Self {
        Self::with_secrets([secret])
    }

    /// Verifies with any of `secrets` (rotation).
    pub fn with_secrets<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            keys: Keys::raw(secrets),
            tolerance: DEFAULT_TOLERANCE,
        }
    }

    /// The timestamp tolerance, both directions \[5 min\].
    #[must_use]
    pub fn with_tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }
}

impl Verifier for Stripe {
    fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> Result<Verified, Rejection> {
        let raw = header(headers, "stripe-signature")?;
        let mut ts: Option<(&str, i64)> = None;
        let mut v1: Vec<Vec<u8>> = Vec::new();
        for pair in raw.split(',') {
            let mut kv = pair.split('=');
            let (Some(k), Some(v), None) = (kv.next(), kv.next(), kv.next()) else {
                return Err(Rejection::bad_request(
                    "Stripe-Signature is not a list of key=value pairs",
                ));
            };
            match k.trim() {
                "t" => ts = Some((v, parse_ts(v)?)),
                // An undecodable v1 entry is ignored, as Stripe's libraries do.
                "v1" => v1.extend(hex_decode(v.trim())),
                _ => {}
            }
        }
        let (ts_raw, ts) =
            ts.ok_or_else(|| Rejection::bad_request("Stripe-Signature has no timestamp"))?;
        if v1.is_empty() {
            return Err(Rejection::bad_request(
                "Stripe-Signature has no v1 signature",
            ));
        }
        check_time(ts, now, self.tolerance)?;
        let parts: [&[u8]; 3] = [ts_raw.trim().as_bytes(), b".", body];
        if !v1.iter().any(|tag| self.keys.matches(&parts, tag)) {
            return Err(Rejection::unauthorized("no Stripe v1 signature matches"));
        }
        let id = serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.get("id")?.as_str().map(str::to_owned));
        Ok(Verified {
            scheme: "stripe",
            id,
            timestamp: Some(ts),
        })
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

/// GitHub: `X-Hub-Signature-256: sha256=<hex>` over the body, keyed with the secret's bytes; the
/// id is `X-GitHub-Delivery`. GitHub signs no timestamp, so replays are stopped by the id dedup.
#[derive(Debug, Clone)]
pub struct GitHub {
    keys: Keys,
}

impl GitHub {
    /// Verifies with `secret`.
    pub fn new(secret: &str) -> Self {
        Self::with_secrets([secret])
    }

    /// Verifies with any of `secrets` (rotation).
    pub fn with_secrets<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            keys: Keys::raw(secrets),
        }
    }
}

impl Verifier for GitHub {
    fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        _now: SystemTime,
    ) -> Result<Verified, Rejection> {
        let raw = header(headers, "x-hub-signature-256")?;
        let hex = raw.trim().strip_prefix("sha256=").ok_or_else(|| {
            Rejection::bad_request("X-Hub-Signature-256 does not start with sha256=")
        })?;
        let tag = hex_decode(hex)
            .ok_or_else(|| Rejection::bad_request("X-Hub-Signature-256 is not hex"))?;
        if !self.keys.matches(&[body], &tag) {
            return Err(Rejection::unauthorized(
                "X-Hub-Signature-256 does not match",
            ));
        }
        let id = headers
            .get("x-github-delivery")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok(Verified {
            scheme: "github",
            id,
            timestamp: None,
        })
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
#[derive(Debug, Clone)]
pub struct GenericHmac {
    name: &'static str,
    keys: Keys,
    header: HeaderName,
    prefix: String,
    encoding: Encoding,
    timestamp_header: Option<HeaderName>,
    id_header: Option<HeaderName>,
    tolerance: Duration,
}

impl GenericHmac {
    /// Signatures in `header`, hex-encoded, over the body, keyed with the secret's bytes.
    pub fn new(name: &'static str, header: HeaderName, secret: &str) -> Self {
        Self {
            name,
            keys: Keys::raw([secret]),
            header,
            prefix: String::new(),
            encoding: Encoding::Hex,
            timestamp_header: None,
            id_header: None,
            tolerance: DEFAULT_TOLERANCE,
        }
    }

    /// The signature value starts with `prefix` (e.g. `sha256=`).
    #[must_use]
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// The signature's encoding \[hex\].
    #[must_use]
    pub fn encoding(mut self, encoding: Encoding) -> Self {
        self.encoding = encoding;
        self
    }

    /// Signs `timestamp.body`, the timestamp (Unix seconds) in `header`, checked against the
    /// tolerance.
    #[must_use]
    pub fn timestamp_header(mut self, header: HeaderName) -> Self {
        self.timestamp_header = Some(header);
        self
    }

    /// The event id is in `header`.
    #[must_use]
    pub fn id_header(mut self, header: HeaderName) -> Self {
        self.id_header = Some(header);
        self
    }

    /// Also accepts `secret` (rotation).
    #[must_use]
    pub fn add_secret(mut self, secret: &str) -> Self {
        self.keys
            .0
            .push(SecretSlice::from(secret.as_bytes().to_vec()));
        self
    }

    /// The timestamp tolerance, both directions \[5 min\].
    #[must_use]
    pub fn with_tolerance(mut self, tolerance: Duration) -> Self {
        self.tolerance = tolerance;
        self
    }
}

impl Verifier for GenericHmac {
    fn verify(
        &self,
        headers: &HeaderMap,
        body: &[u8],
        now: SystemTime,
    ) -> Result<Verified, Rejection> {
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
        .ok_or_else(|| {
            Rejection::bad_request(format!("{} is not valid {:?}", self.header, self.encoding))
        })?;
        let (ok, timestamp) = match &self.timestamp_header {
            Some(h) => {
                let ts_raw = header(headers, h.as_str())?;
                let ts = parse_ts(ts_raw)?;
                check_time(ts, now, self.tolerance)?;
                (
                    self.keys
                        .matches(&[ts_raw.trim().as_bytes(), b".", body], &tag),
                    Some(ts),
                )
            }
            None => (self.keys.matches(&[body], &tag), None),
        };
        if !ok {
            return Err(Rejection::unauthorized(format!(
                "{} does not match",
                self.header
            )));
        }
        let id = self
            .id_header
            .as_ref()
            .and_then(|h| headers.get(h))
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok(Verified {
            scheme: self.name,
            id,
            timestamp,
        })
    }
}
