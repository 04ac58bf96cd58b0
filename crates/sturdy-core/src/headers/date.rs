//! HTTP dates (RFC 9110 §5.6.7), read leniently.
//!
//! All three formats are accepted (IMF-fixdate, RFC 850, asctime). Beyond the strict grammar,
//! the reader tolerates what real servers send: a day name that does not match the date (RFC
//! 8594's own example), a one-digit day, and `UTC`, `Z` or `+0000` in place of `GMT`. A date
//! before 1970 is an error; the result never depends on the local time zone.

use std::time::{Duration, SystemTime};

use super::HeaderParseError;

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];

/// Parses an HTTP date, leniently (see the module docs).
///
/// # Errors
/// A [`HeaderParseError`] naming `header` when the value is not a date.
pub fn parse_http_date(value: &[u8], header: &'static str) -> Result<SystemTime, HeaderParseError> {
    let err = |r: &str| HeaderParseError::new(header, r.to_owned());
    let s = std::str::from_utf8(value)
        .map_err(|_| err("not ASCII"))?
        .trim();
    if s.is_empty() {
        return Err(err("empty"));
    }
    if let Ok(t) = httpdate::parse_http_date(s) {
        return Ok(t);
    }
    lenient(s).ok_or_else(|| err("not an HTTP date"))
}

/// Formats a time as an IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`. Total: a time before
/// 1970 or after 9999 (which a peer can send, e.g. `Deprecation: @99999999999999`) is written as
/// the nearest date the format can hold.
pub fn format_http_date(t: SystemTime) -> String {
    // 9999-12-31T23:59:59Z, the last instant an IMF-fixdate can write.
    let last = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_799);
    httpdate::fmt_http_date(t.clamp(SystemTime::UNIX_EPOCH, last))
}

fn lenient(s: &str) -> Option<SystemTime> {
    let cleaned = s.replace(',', " ");
    let mut tokens: Vec<&str> = cleaned.split_ascii_whitespace().collect();
    // Drop a leading day name, whatever it says.
    if tokens
        .first()
        .is_some_and(|t| t.chars().all(|c| c.is_ascii_alphabetic()) && month(t).is_none())
    {
        tokens.remove(0);
    }
    // Drop a trailing zone that means UTC.
    if let Some(z) = tokens.last() {
        match z.to_ascii_uppercase().as_str() {
            "GMT" | "UTC" | "UT" | "Z" | "+0000" | "-0000" => {
                tokens.pop();
            }
            _ => {}
        }
    }
    let (day, mon, year, time) = match tokens.as_slice() {
        // 6 Nov 1994 08:49:37  |  06-Nov-94 08:49:37
        [dmy, time] => {
            let mut parts = dmy.split('-');
            let (d, m, y) = (parts.next()?, parts.next()?, parts.next()?);
            if parts.next().is_some() {
                return None;
            }
            (d, m, y, *time)
        }
        [d, m, y, time] if d.bytes().all(|b| b.is_ascii_digit()) => (*d, *m, *y, *time),
        // asctime: Nov  6 08:49:37 1994
        [m, d, time, y] => (*d, *m, *y, *time),
        _ => return None,
    };
    let day: u32 = parse_digits(day, 1, 2)?;
    let mon = month(mon)?;
    let two_digits = year.len() == 2;
    let mut year: i64 = i64::from(parse_digits(year, 2, 4)?);
    if two_digits {
        // RFC 850 two-digit years: 70..99 => 19xx, 00..69 => 20xx. A reader without a clock
        // cannot apply the "50 years in the future" rule exactly; this window agrees with it
        // until 2070.
        year += if year >= 70 { 1900 } else { 2000 };
    }
    let mut hms = time.split(':');
    let h: u32 = parse_digits(hms.next()?, 1, 2)?;
    let m: u32 = parse_digits(hms.next()?, 2, 2)?;
    let sec: u32 = parse_digits(hms.next()?, 2, 2)?;
    if hms.next().is_some()
        || h > 23
        || m > 59
        || sec > 60
        || day == 0
        || day > days_in_month(year, mon)
    {
        return None;
    }
    let days = days_from_civil(year, mon, day);
    let secs = days.checked_mul(86_400)? + i64::from(h * 3_600 + m * 60 + sec.min(59));
    let secs = u64::try_from(secs).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs))
}

fn parse_digits(s: &str, min: usize, max: usize) -> Option<u32> {
    if s.len() < min || s.len() > max || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn month(s: &str) -> Option<u32> {
    let lower = s.to_ascii_lowercase();
    MONTHS
        .iter()
        .position(|m| *m == lower)
        .map(|i| i as u32 + 1)
}

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
pub(crate) fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    #[test]
    fn formatting_never_panics_on_times_a_peer_can_send() {
        use std::time::Duration;
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(99_999_999_999_999);
        assert_eq!(format_http_date(far), "Fri, 31 Dec 9999 23:59:59 GMT");
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(5);
        assert_eq!(format_http_date(before), "Thu, 01 Jan 1970 00:00:00 GMT");
    }

    use super::*;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn three_formats() {
        // RFC 9110 §5.6.7: all three denote 784111777.
        for s in [
            "Sun, 06 Nov 1994 08:49:37 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(
                parse_http_date(s.as_bytes(), "Date").unwrap(),
                at(784_111_777),
                "{s}"
            );
        }
    }

    #[test]
    fn lenient_forms() {
        // 2019-06-03T12:00:00Z = 1559563200
        assert_eq!(
            parse_http_date(b"Mon, 3 Jun 2019 12:00:00 UTC", "Date").unwrap(),
            at(1_559_563_200)
        );
        // RFC 8594's example: a Saturday that was a Monday.
        let sat = parse_http_date(b"Sat, 31 Dec 2018 23:59:59 GMT", "Sunset").unwrap();
        let mon = parse_http_date(b"Mon, 31 Dec 2018 23:59:59 GMT", "Sunset").unwrap();
        assert_eq!(sat, mon);
        assert_eq!(sat, at(1_546_300_799));
        assert_eq!(
            parse_http_date(b"Sun, 30 Jun 2024 23:59:59 UTC", "Sunset").unwrap(),
            at(1_719_791_999)
        );
    }

    #[test]
    fn four_digit_years_before_1970_are_errors_not_this_century() {
        for v in [
            "Mon, 01 Jan 0001 00:00:00 GMT",
            "Sat, 01 Jan 0050 00:00:00 GMT",
            "Thu, 31 Dec 0099 23:59:59 GMT",
            "Wed, 31 Dec 1969 23:59:59 GMT",
            "01 Jan 0070 00:00:00 GMT",
            "Jan  1 00:00:00 0069",
        ] {
            assert!(parse_http_date(v.as_bytes(), "date").is_err(), "{v}");
        }
        // Two-digit years still follow the RFC 850 window.
        assert_eq!(
            parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT", "date").unwrap(),
            at(784_111_777)
        );
    }

    #[test]
    fn garbage() {
        for s in [
            "",
            "tomorrow",
            "Mon, 32 Jan 2019 00:00:00 GMT",
            "Mon, 29 Feb 2019 00:00:00 GMT",
            "Sun, 06 Nov 1994 25:00:00 GMT",
            "Thu, 01 Jan 1960 00:00:00 GMT",
            "\u{b2}",
        ] {
            assert!(parse_http_date(s.as_bytes(), "Date").is_err(), "{s}");
        }
    }

    #[test]
    fn formats_imf_fixdate() {
        assert_eq!(
            format_http_date(at(784_111_777)),
            "Sun, 06 Nov 1994 08:49:37 GMT"
        );
    }
}
