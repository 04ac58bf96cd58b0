use std::time::{Duration, SystemTime};

use http::HeaderMap;

use super::{date::parse_http_date, trim_ows, HeaderParseError};

const NAME: &str = "Retry-After";

/// A parsed `Retry-After` value (RFC 9110 §10.2.3): delay-seconds or an HTTP-date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAfter {
    /// Wait this long from now.
    Delay(Duration),
    /// Wait until this instant.
    At(SystemTime),
}

impl RetryAfter {
    /// Parses a header value.
    ///
    /// delay-seconds is `1*DIGIT` with optional white space around it; a value too large for a
    /// `Duration` saturates. Negative (`-1`), signed (`+1`), fractional (`1.0`) and non-ASCII
    /// digits are errors. Dates are read leniently (see [`parse_http_date`]).
    ///
    /// # Errors
    /// A [`HeaderParseError`] that says what was wrong.
    pub fn parse(value: &[u8]) -> Result<Self, HeaderParseError> {
        let v = trim_ows(value);
        if v.is_empty() {
            return Err(HeaderParseError::new(NAME, "empty"));
        }
        if v.iter().all(u8::is_ascii_digit) {
            // Saturate rather than fail: 99999999999999999999 seconds is "a very long time".
            let secs = v.iter().try_fold(0u64, |acc, d| {
                acc.checked_mul(10)
                    .and_then(|a| a.checked_add(u64::from(d - b'0')))
            });
            return Ok(Self::Delay(Duration::from_secs(secs.unwrap_or(u64::MAX))));
        }
        if v.first()
            .is_some_and(|c| c.is_ascii_digit() || *c == b'-' || *c == b'+')
        {
            return Err(HeaderParseError::new(
                NAME,
                "expected a non-negative whole number of seconds or an HTTP date",
            ));
        }
        parse_http_date(v, NAME).map(Self::At)
    }

    /// Reads the first `Retry-After` header of a response, if any; an unparseable value is
    /// ignored (returns `None`), as a client should.
    pub fn from_headers(headers: &HeaderMap) -> Option<Self> {
        headers
            .get(http::header::RETRY_AFTER)
            .and_then(|v| Self::parse(v.as_bytes()).ok())
    }

    /// How long to wait from `now`; a date in the past means no wait.
    pub fn delay_from(&self, now: SystemTime) -> Duration {
        match self {
            Self::Delay(d) => *d,
            Self::At(t) => t.duration_since(now).unwrap_or(Duration::ZERO),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> SystemTime {
        // 2019-06-03T11:00:00Z, the urllib3 test's clock.
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_559_559_600)
    }

    #[test]
    fn delay_seconds() {
        for (s, d) in [
            ("0", 0),
            ("1000", 1000),
            ("\t42 ", 42),
            ("120", 120),
            ("3600", 3600),
        ] {
            assert_eq!(
                RetryAfter::parse(s.as_bytes()).unwrap(),
                RetryAfter::Delay(Duration::from_secs(d)),
                "{s:?}"
            );
        }
        assert_eq!(
            RetryAfter::parse(b"99999999999999999999999").unwrap(),
            RetryAfter::Delay(Duration::from_secs(u64::MAX))
        );
    }

    #[test]
    fn invalid() {
        for s in ["-1", "+1", "1.0", "\u{b2}", "", "  ", "soon", "1e3"] {
            assert!(RetryAfter::parse(s.as_bytes()).is_err(), "{s:?}");
        }
    }

    #[test]
    fn dates_relative_to_now() {
        for (s, d) in [
            ("Mon, 3 Jun 2019 12:00:00 UTC", 3600),
            ("Mon, 3 Jun 2019 11:00:00 UTC", 0),
            ("Mon, 03 Jun 2019 11:30:12 GMT", 1812),
            ("Monday, 03-Jun-19 11:30:12 GMT", 1812),
            ("Mon Jun  3 11:30:12 2019", 1812),
            ("Fri, 31 Dec 1999 23:59:59 GMT", 0),
        ] {
            let ra = RetryAfter::parse(s.as_bytes()).unwrap();
            assert_eq!(ra.delay_from(now()), Duration::from_secs(d), "{s}");
        }
    }
}
