use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderName, StatusCode};

use super::sf::{self, BareItem, Member};
use super::{date::parse_http_date, trim_ows, HeaderParseError, RetryAfter};

/// One service-limit item of the `RateLimit` field (draft-ietf-httpapi-ratelimit-headers-10):
/// `RateLimit: "default";r=0;t=50`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitItem {
    /// The policy the item refers to.
    pub policy: String,
    /// Quota units left (`r`).
    pub remaining: u64,
    /// Seconds until more quota is available (`t`), if given.
    pub reset: Option<Duration>,
    /// The partition key (`pk`), if given as the Byte Sequence the draft makes it; a `pk` of
    /// another type (`pk=abc`) is left out, and the rest of the item is kept.
    pub partition_key: Option<Vec<u8>>,
}

impl RateLimitItem {
    /// Parses every `RateLimit` field line of a response. No field gives an empty list.
    ///
    /// # Errors
    /// A malformed field (the draft says a client then ignores the whole field).
    pub fn from_headers(headers: &HeaderMap) -> Result<Vec<Self>, HeaderParseError> {
        let members = list(headers, &RATELIMIT, "RateLimit")?;
        members
            .iter()
            .map(|m| {
                let err = |r: &str| HeaderParseError::new("RateLimit", r.to_owned());
                let policy =
                    item_name(m).ok_or_else(|| err("an item must be a policy name (a string)"))?;
                let remaining = non_negative(m.param("r")).ok_or_else(|| {
                    err("r (remaining) is required and must be a non-negative integer")
                })?;
                let reset = match m.param("t") {
                    None => None,
                    Some(v) => Some(Duration::from_secs(
                        non_negative(Some(v))
                            .ok_or_else(|| err("t must be a non-negative integer"))?,
                    )),
                };
                Ok(Self {
                    policy,
                    remaining,
                    reset,
                    partition_key: byte_seq(m.param("pk")),
                })
            })
            .collect()
    }
}

/// One policy of the `RateLimit-Policy` field: `RateLimit-Policy: "burst";q=100;w=60`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitPolicy {
    /// The policy name.
    pub name: String,
    /// The quota (`q`).
    pub quota: u64,
    /// The quota unit (`qu`), `requests` unless given.
    pub unit: String,
    /// The window (`w`), if given.
    pub window: Option<Duration>,
    /// The partition key (`pk`), if given as the Byte Sequence the draft makes it; a `pk` of
    /// another type (`pk=abc`) is left out, and the rest of the item is kept.
    pub partition_key: Option<Vec<u8>>,
}

impl RateLimitPolicy {
    /// Parses every `RateLimit-Policy` field line of a response.
    ///
    /// # Errors
    /// A malformed field.
    pub fn from_headers(headers: &HeaderMap) -> Result<Vec<Self>, HeaderParseError> {
        let members = list(headers, &RATELIMIT_POLICY, "RateLimit-Policy")?;
        members
            .iter()
            .map(|m| {
                let err = |r: &str| HeaderParseError::new("RateLimit-Policy", r.to_owned());
                let name = item_name(m).ok_or_else(|| err("a policy must be named by a string"))?;
                let quota = non_negative(m.param("q")).ok_or_else(|| {
                    err("q (quota) is required and must be a non-negative integer")
                })?;
                let unit = match m.param("qu") {
                    None => "requests".to_owned(),
                    Some(BareItem::String(s)) => s.clone(),
                    Some(_) => return Err(err("qu must be a string")),
                };
                let window = match m.param("w") {
                    None => None,
                    Some(v) => match non_negative(Some(v)) {
                        Some(w) if w > 0 => Some(Duration::from_secs(w)),
                        _ => return Err(err("w must be a positive integer")),
                    },
                };
                Ok(Self {
                    name,
                    quota,
                    unit,
                    window,
                    partition_key: byte_seq(m.param("pk")),
                })
            })
            .collect()
    }
}

static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

/// The de-facto names, by what they hold, in the order they are looked up.
static LIMIT: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-limit"),
    HeaderName::from_static("x-rate-limit-limit"),
    HeaderName::from_static("ratelimit-limit"),
];
static REMAINING: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-remaining"),
    HeaderName::from_static("x-rate-limit-remaining"),
    HeaderName::from_static("ratelimit-remaining"),
];
static RESET: [HeaderName; 3] = [
    HeaderName::from_static("x-ratelimit-reset"),
    HeaderName::from_static("x-rate-limit-reset"),
    HeaderName::from_static("ratelimit-reset"),
];

fn list(
    headers: &HeaderMap,
    name: &HeaderName,
    display: &'static str,
) -> Result<Vec<Member>, HeaderParseError> {
    if !headers.contains_key(name) {
        return Ok(Vec::new());
    }
    sf::parse_list(
        headers
            .get_all(name)
            .iter()
            .map(http::HeaderValue::as_bytes),
    )
    .map_err(|e| HeaderParseError::new(display, e.to_string()))
}

fn item_name(m: &Member) -> Option<String> {
    match m {
        Member::Item(BareItem::String(s), _) => Some(s.clone()),
        _ => None,
    }
}

fn non_negative(v: Option<&BareItem>) -> Option<u64> {
    v.and_then(BareItem::as_integer)
        .and_then(|i| u64::try_from(i).ok())
}

fn byte_seq(v: Option<&BareItem>) -> Option<Vec<u8>> {
    match v {
        Some(BareItem::ByteSeq(b)) => Some(b.clone()),
        _ => None,
    }
}

/// The de-facto `X-RateLimit-Limit`, `-Remaining` and `-Reset` headers (also spelled
/// `X-Rate-Limit-*`, and the older drafts' `RateLimit-Limit/-Remaining/-Reset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct XRateLimit {
    /// The quota in the window.
    pub limit: Option<u64>,
    /// What is left of it.
    pub remaining: Option<u64>,
    /// How long until the quota resets, from `now`.
    pub reset: Option<Duration>,
}

impl XRateLimit {
    /// Reads the headers; `None` when none of them is present and valid.
    ///
    /// The reset value is read as vendors send it: a whole or decimal number of seconds to wait,
    /// a Unix time in seconds (values from 10^9, whole or decimal) or milliseconds (from 10^12),
    /// an HTTP date, or an RFC 3339 date-time (`2026-12-05T03:00:00Z`).
    /// A reset in the past reads as zero. Unparseable values are ignored.
    pub fn from_headers(headers: &HeaderMap, now: SystemTime) -> Option<Self> {
        let get = |names: &[HeaderName; 3]| names.iter().find_map(|n| headers.get(n));
        let int = |names: &[HeaderName; 3]| {
            get(names).and_then(|v| {
                std::str::from_utf8(trim_ows(v.as_bytes()))
                    .ok()?
                    .parse::<u64>()
                    .ok()
            })
        };
        let out = Self {
            limit: int(&LIMIT),
            remaining: int(&REMAINING),
            reset: get(&RESET).and_then(|v| parse_reset(v.as_bytes(), now)),
        };
        (out != Self::default()).then_some(out)
    }
}

fn parse_reset(v: &[u8], now: SystemTime) -> Option<Duration> {
    let v = trim_ows(v);
    let s = std::str::from_utf8(v).ok()?;
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        let n: u64 = s.parse().unwrap_or(u64::MAX);
        // Checked: where `SystemTime` holds a narrower range (Windows), a peer's far date would
        // overflow; such a date is as far as any (the caller caps the pause).
        let since_epoch = |d: Duration| {
            SystemTime::UNIX_EPOCH
                .checked_add(d)
                .map_or(Duration::MAX, |t| {
                    t.duration_since(now).unwrap_or(Duration::ZERO)
                })
        };
        return Some(if n >= 1_000_000_000_000 {
            since_epoch(Duration::from_millis(n))
        } else if n >= 1_000_000_000 {
            since_epoch(Duration::from_secs(n))
        } else {
            Duration::from_secs(n)
        });
    }
    if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let f: f64 = s.parse().ok()?;
        // The same ranges as a whole number: a decimal Unix time (`1700000042.5`) is a time,
        // not 54 years to wait.
        return if f >= 1e12 {
            Some(since_epoch_f(f / 1e3, now))
        } else if f >= 1e9 {
            Some(since_epoch_f(f, now))
        } else {
            Duration::try_from_secs_f64(f).ok()
        };
    }
    let at = parse_http_date(v, "X-RateLimit-Reset")
        .ok()
        .or_else(|| super::date::parse_rfc3339(s))?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

/// The time from `now` to `secs` seconds after the Unix epoch (zero when it is past; as far as
/// any when it is past what a `SystemTime` holds).
fn since_epoch_f(secs: f64, now: SystemTime) -> Duration {
    Duration::try_from_secs_f64(secs)
        .ok()
        .and_then(|d| SystemTime::UNIX_EPOCH.checked_add(d))
        .map_or(Duration::MAX, |t| {
            t.duration_since(now).unwrap_or(Duration::ZERO)
        })
}

/// Where a [`PauseHint`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseSource {
    /// `Retry-After` on a 429 or 503.
    RetryAfter,
    /// `RateLimit` with `r=0`.
    RateLimit,
    /// `X-RateLimit-Remaining: 0` (or a variant) with a reset.
    XRateLimit,
}

/// How long a server asked every caller to hold off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PauseHint {
    /// How long, from `now`.
    pub delay: Duration,
    /// Which header said so.
    pub source: PauseSource,
}

/// Whether a response may carry a pause at all: a 429 or 503, or any of the quota headers. A
/// cheap check (no parsing, no clock) to run before [`pause_hint`] on every response.
pub fn may_pause(status: StatusCode, headers: &HeaderMap) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::SERVICE_UNAVAILABLE
        || (!headers.is_empty()
            && (headers.contains_key(&RATELIMIT)
                || REMAINING.iter().any(|n| headers.contains_key(n))))
}

/// What a response says about waiting, in the order the RateLimit draft asks for: `Retry-After`
/// on a 429 or 503 first; else a `RateLimit` item with no quota left and a reset (the longest if
/// several); else `X-RateLimit-Remaining: 0` with a reset. Malformed headers are ignored.
pub fn pause_hint(status: StatusCode, headers: &HeaderMap, now: SystemTime) -> Option<PauseHint> {
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
        if let Some(ra) = RetryAfter::from_headers(headers) {
            return Some(PauseHint {
                delay: ra.delay_from(now),
                source: PauseSource::RetryAfter,
            });
        }
    }
    if let Ok(items) = RateLimitItem::from_headers(headers) {
        if let Some(delay) = items
            .iter()
            .filter(|i| i.remaining == 0)
            .filter_map(|i| i.reset)
            .max()
        {
            return Some(PauseHint {
                delay,
                source: PauseSource::RateLimit,
            });
        }
    }
    let x = XRateLimit::from_headers(headers, now)?;
    match (x.remaining, x.reset) {
        (Some(0), Some(delay)) => Some(PauseHint {
            delay,
            source: PauseSource::XRateLimit,
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    fn epoch(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn x_ratelimit_reset_forms() {
        let now = epoch(1_700_000_000);
        let r = |v: &str| {
            XRateLimit::from_headers(&headers(&[("x-ratelimit-reset", v)]), now)
                .and_then(|x| x.reset)
        };
        assert_eq!(r("30"), Some(Duration::from_secs(30)));
        assert_eq!(r("1700000042"), Some(Duration::from_secs(42)));
        assert_eq!(r("1700000042000"), Some(Duration::from_secs(42)));
        assert_eq!(r("1600000000"), Some(Duration::ZERO));
        assert_eq!(r("1.5"), Some(Duration::from_millis(1_500)));
        // A decimal Unix time is a time, as a whole one is (it read as 54 years to wait).
        assert_eq!(r("1700000042.5"), Some(Duration::from_millis(42_500)));
        assert_eq!(r("1700000042500.0"), Some(Duration::from_millis(42_500)));
        assert_eq!(r("1600000000.25"), Some(Duration::ZERO));
        assert_eq!(
            r("999999999.5"),
            Some(Duration::from_secs_f64(999_999_999.5))
        );
        // Past what a `SystemTime` holds: as far as any (the caller caps the pause).
        assert_eq!(r(&format!("{}.5", "9".repeat(300))), Some(Duration::MAX));
        // RFC 3339, which some vendors send.
        assert_eq!(r("2023-11-14T22:14:02Z"), Some(Duration::from_secs(42)));
        assert_eq!(
            r("2023-11-14T23:14:02.5+01:00"),
            Some(Duration::from_millis(42_500))
        );
        assert_eq!(r("2023-11-14T22:00:00Z"), Some(Duration::ZERO));
        assert_eq!(r("2023-11-14T22:14:02"), None);
        assert_eq!(r("soon"), None);
        let x = XRateLimit::from_headers(
            &headers(&[
                ("X-Rate-Limit-Limit", "60"),
                ("X-Rate-Limit-Remaining", "0"),
            ]),
            now,
        )
        .unwrap();
        assert_eq!((x.limit, x.remaining), (Some(60), Some(0)));
        assert!(XRateLimit::from_headers(&HeaderMap::new(), now).is_none());
    }

    #[test]
    fn precedence() {
        let now = epoch(1_700_000_000);
        let h = headers(&[("retry-after", "7"), ("ratelimit", "\"default\";r=0;t=50")]);
        assert_eq!(
            pause_hint(StatusCode::TOO_MANY_REQUESTS, &h, now)
                .unwrap()
                .source,
            PauseSource::RetryAfter
        );
        // Retry-After on a 200 is not a pause; RateLimit r=0 is.
        let hint = pause_hint(StatusCode::OK, &h, now).unwrap();
        assert_eq!(
            (hint.delay, hint.source),
            (Duration::from_secs(50), PauseSource::RateLimit)
        );
        let h = headers(&[
            ("x-ratelimit-remaining", "0"),
            ("x-ratelimit-reset", "1700000010"),
        ]);
        assert_eq!(
            pause_hint(StatusCode::FORBIDDEN, &h, now).unwrap().delay,
            Duration::from_secs(10)
        );
        let h = headers(&[("x-ratelimit-remaining", "3"), ("x-ratelimit-reset", "10")]);
        assert!(pause_hint(StatusCode::OK, &h, now).is_none());
        // Malformed RateLimit is ignored.
        let h = headers(&[("ratelimit", "default;r=0;t=5")]);
        assert!(pause_hint(StatusCode::OK, &h, now).is_none());
    }
}
