//! HTTP dates (RFC 9110 §5.6.7), read leniently.
//!
//! All three formats are accepted (IMF-fixdate, RFC 850, asctime). Beyond the strict grammar,
//! the reader tolerates what real servers send: a day name that does not match the date (RFC
//! 8594's own example), a one-digit day, and `UTC`, `Z` or `+0000` in place of `GMT`. An RFC 850
//! two-digit year is read as RFC 9110 says, against today's date: the latest year with those two
//! digits that is at most 50 years ahead (in 2026, `70` is 2070 and `77` is 1977). A date
//! before 1970 is an error for [`parse_http_date`] (a `Retry-After` or a reset that old is
//! ignored, not read as "now"), and that date for [`parse_http_date_any_year`] (a `Sunset`
//! long past is still reported); the result never depends on the local time zone.

use std::time::{Duration, SystemTime};

use super::HeaderParseError;
use crate::clock::WallClock;

const MONTHS: [&str; 12] = [
    "jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec",
];

/// Parses an HTTP date, leniently (see the module docs).
///
/// # Errors
/// A [`HeaderParseError`] naming `header` when the value is not a date.
pub fn parse_http_date(value: &[u8], header: &'static str) -> Result<SystemTime, HeaderParseError> {
    let t = parse_http_date_any_year(value, header)?;
    if t < SystemTime::UNIX_EPOCH {
        return Err(HeaderParseError::new(header, "not an HTTP date".to_owned()));
    }
    Ok(t)
}

/// Parses an HTTP date as [`parse_http_date`] does, but reads a date before 1970 as that date (a
/// `SystemTime` before the epoch) rather than as an error: for headers that report a date, such
/// as `Sunset` and `Deprecation`, where a date long past is still news. Years 1 to 9999.
///
/// # Errors
/// A [`HeaderParseError`] naming `header` when the value is not a date, or the date is one
/// this platform's `SystemTime` cannot hold.
pub fn parse_http_date_any_year(
    value: &[u8],
    header: &'static str,
) -> Result<SystemTime, HeaderParseError> {
    let err = |r: &str| HeaderParseError::new(header, r.to_owned());
    let s = std::str::from_utf8(value)
        .map_err(|_| err("not ASCII"))?
        .trim();
    if s.is_empty() {
        return Err(err("empty"));
    }
    // httpdate reads an RFC 850 two-digit year in a fixed window (70 is 1970); the RFC's rule
    // depends on today's date, so such a date (the only format with `-` in it) is read below.
    if !s.contains('-') {
        if let Ok(t) = httpdate::parse_http_date(s) {
            return Ok(t);
        }
    }
    let secs = lenient(s).ok_or_else(|| err("not an HTTP date"))?;
    let t = if secs >= 0 {
        SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(secs.unsigned_abs()))
    } else {
        SystemTime::UNIX_EPOCH.checked_sub(Duration::from_secs(secs.unsigned_abs()))
    };
    t.ok_or_else(|| err("a date this platform cannot hold"))
}

/// Formats a time as an IMF-fixdate, e.g. `Sun, 06 Nov 1994 08:49:37 GMT`. Total: a time before
/// 1970 or after 9999 (which a peer can send, e.g. `Deprecation: @99999999999999`) is written as
/// the nearest date the format can hold.
pub fn format_http_date(t: SystemTime) -> String {
    // 9999-12-31T23:59:59Z, the last instant an IMF-fixdate can write.
    let last = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(253_402_300_799);
    httpdate::fmt_http_date(t.clamp(SystemTime::UNIX_EPOCH, last))
}

/// Seconds since 1970 (negative before) of a leniently read HTTP date.
fn lenient(s: &str) -> Option<i64> {
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
        year = full_year(year, current_year());
    } else if year == 0 {
        // There is no year 0 in the Gregorian calendar an HTTP date is written in: 1 BC is
        // followed by AD 1.
        return None;
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
    days.checked_mul(86_400)?
        .checked_add(i64::from(h * 3_600 + m * 60 + sec.min(59)))
}

/// An RFC 3339 date-time (`2026-12-05T03:00:00Z`, `2026-12-05 03:00:00.250+01:00`), as some
/// vendors send their rate-limit reset. `None` for anything else, for a time before 1970, and for
/// a value longer than any such date-time can be (so a hostile value costs nothing to refuse).
/// A leap second reads as the second before it, as in [`parse_http_date`].
pub(crate) fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    // 2026-12-05T03:00:00.123456789+01:00 is 35 bytes; a longer fraction is allowed up to 64.
    if s.len() > 64 || !s.is_ascii() {
        return None;
    }
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let year: i64 = i64::from(parse_digits(&s[0..4], 4, 4)?);
    let mon = parse_digits(&s[5..7], 2, 2)?;
    let day = parse_digits(&s[8..10], 2, 2)?;
    let (h, m, sec) = (
        parse_digits(&s[11..13], 2, 2)?,
        parse_digits(&s[14..16], 2, 2)?,
        parse_digits(&s[17..19], 2, 2)?,
    );
    if !(1..=12).contains(&mon) || day == 0 || day > days_in_month(year, mon) {
        return None;
    }
    if h > 23 || m > 59 || sec > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        // Nanoseconds from the first nine digits; the rest are below what a `SystemTime` keeps.
        for (i, d) in frac.bytes().take(9).take(digits).enumerate() {
            nanos += u32::from(d - b'0') * 10u32.pow(8 - i as u32);
        }
        rest = &frac[digits..];
    }
    let offset: i64 = match rest.as_bytes() {
        [b'Z' | b'z'] => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let oh = parse_digits(std::str::from_utf8(&[*h1, *h2]).ok()?, 2, 2)?;
            let om = parse_digits(std::str::from_utf8(&[*m1, *m2]).ok()?, 2, 2)?;
            if oh > 23 || om > 59 {
                return None;
            }
            let o = i64::from(oh * 3_600 + om * 60);
            if *sign == b'+' {
                o
            } else {
                -o
            }
        }
        _ => return None,
    };
    let days = days_from_civil(year, mon, day);
    let local = days * 86_400 + i64::from(h * 3_600 + m * 60 + sec.min(59));
    let secs = u64::try_from(local - offset).ok()?;
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
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

/// The year of a two-digit RFC 850 year, read as RFC 9110 §5.6.7 says: a year that appears to
/// be more than 50 years in the future is the most recent past year with the same last two
/// digits. So the latest year with those digits that is at most `this_year + 50` (in 2026: `76`
/// is 2076, `77` is 1977). Whole years: a date in the fiftieth year ahead is read as ahead.
fn full_year(two_digits: i64, this_year: i64) -> i64 {
    let last = this_year + 50;
    last - (last - two_digits).rem_euclid(100)
}

/// This year (UTC) by the system clock, for [`full_year`].
fn current_year() -> i64 {
    let secs = crate::clock::SystemClock
        .now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    year_of_day(secs.div_euclid(86_400))
}

/// The proleptic Gregorian year of a day counted from 1970-01-01 (Howard Hinnant's algorithm,
/// the inverse of [`days_from_civil`]).
fn year_of_day(days: i64) -> i64 {
    let z = days.saturating_add(719_468);
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let year = yoe + era * 400;
    // Months are counted from March: January and February belong to the next year.
    if mp >= 10 {
        year + 1
    } else {
        year
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
    use super::{current_year, days_from_civil, full_year, parse_http_date, year_of_day};
    use std::time::{Duration, SystemTime};

    #[test]
    fn two_digit_years_are_read_against_this_year_as_rfc_9110_says() {
        for (yy, this, want) in [
            (70, 2026, 2070),
            (76, 2026, 2076),
            (77, 2026, 1977),
            (94, 2026, 1994),
            (0, 2026, 2000),
            (26, 2026, 2026),
            (69, 2019, 2069),
            (70, 2019, 1970),
            (99, 2049, 2099),
            (0, 2051, 2100),
        ] {
            assert_eq!(full_year(yy, this), want, "{yy} in {this}");
        }
    }

    #[test]
    fn the_year_of_a_day_inverts_days_from_civil() {
        for y in (1..=9999).step_by(7).chain([1969, 1970, 2000, 2026, 2100]) {
            for (m, d) in [(1, 1), (2, 28), (3, 1), (12, 31)] {
                assert_eq!(year_of_day(days_from_civil(y, m, d)), y, "{y}-{m}-{d}");
            }
        }
        assert!((2026..2200).contains(&current_year()));
    }

    #[test]
    fn an_rfc_850_date_in_the_seventies_is_read_in_this_century() {
        let this = current_year();
        let t = parse_http_date(b"Wednesday, 01-Jan-70 00:00:00 GMT", "Date").unwrap();
        let want = days_from_civil(full_year(70, this), 1, 1) * 86_400;
        let got = t.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        assert_eq!(i64::try_from(got).unwrap(), want);
        if this <= 2076 {
            assert!(t > SystemTime::UNIX_EPOCH + Duration::from_secs(3_000_000_000));
        }
        let t = parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT", "Date").unwrap();
        assert_eq!(t, SystemTime::UNIX_EPOCH + Duration::from_secs(784_111_777));
    }

    #[test]
    fn formatting_never_panics_on_times_a_peer_can_send() {
        use std::time::Duration;
        let far = SystemTime::UNIX_EPOCH + Duration::from_secs(99_999_999_999_999);
        assert_eq!(format_http_date(far), "Fri, 31 Dec 9999 23:59:59 GMT");
        let before = SystemTime::UNIX_EPOCH - Duration::from_secs(5);
        assert_eq!(format_http_date(before), "Thu, 01 Jan 1970 00:00:00 GMT");
    }

    use super::*;

    #[test]
    fn any_year_reads_dates_before_1970_as_themselves() {
        let before = |secs: u64| SystemTime::UNIX_EPOCH - Duration::from_secs(secs);
        for (v, want) in [
            ("Mon, 01 Jan 1900 00:00:00 GMT", before(2_208_988_800)),
            ("Wed, 31 Dec 1969 23:59:59 GMT", before(1)),
            ("31 Dec 1969 23:59:59 UTC", before(1)),
            ("Wed Dec 31 23:59:59 1969", before(1)),
            ("Mon, 01 Jan 0001 00:00:00 GMT", before(62_135_596_800)),
            ("Sun, 06 Nov 1994 08:49:37 GMT", at(784_111_777)),
        ] {
            assert_eq!(
                parse_http_date_any_year(v.as_bytes(), "Sunset"),
                Ok(want),
                "{v}"
            );
        }
        for v in [
            "",
            "soon",
            "Sat, 01 Jan 10000 00:00:00 GMT",
            "Mon, 32 Jan 1900 00:00:00 GMT",
            // No year 0.
            "Sat, 01 Jan 0000 00:00:00 GMT",
            "01-Jan-0000 00:00:00 GMT",
            "Sat Jan  1 00:00:00 0000",
            "Sat, 01 Jan 000 00:00:00 GMT",
        ] {
            assert!(
                parse_http_date_any_year(v.as_bytes(), "Sunset").is_err(),
                "{v}"
            );
        }
        // The strict reader still refuses them.
        assert!(parse_http_date(b"Wed, 31 Dec 1969 23:59:59 GMT", "Retry-After").is_err());
    }

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
    }

    #[test]
    fn rfc3339_date_times() {
        let t = |s: &str| parse_rfc3339(s);
        assert_eq!(t("1994-11-06T08:49:37Z"), Some(at(784_111_777)));
        assert_eq!(t("1994-11-06t08:49:37z"), Some(at(784_111_777)));
        assert_eq!(t("1994-11-06 08:49:37Z"), Some(at(784_111_777)));
        assert_eq!(t("1994-11-06T09:49:37+01:00"), Some(at(784_111_777)));
        assert_eq!(t("1994-11-06T07:19:37-01:30"), Some(at(784_111_777)));
        assert_eq!(
            t("1994-11-06T08:49:37.25Z"),
            Some(at(784_111_777) + Duration::from_millis(250))
        );
        // Digits past the ninth are read and dropped.
        assert_eq!(
            t("1994-11-06T08:49:37.1234567891234Z"),
            Some(at(784_111_777) + Duration::from_nanos(123_456_789))
        );
        // A leap second reads as the second before it.
        assert_eq!(t("2016-12-31T23:59:60Z"), Some(at(1_483_228_799)));
        assert_eq!(t("2024-02-29T00:00:00Z"), Some(at(1_709_164_800)));
        for bad in [
            "",
            "1994-11-06",
            "1994-11-06T08:49:37",
            "1994-11-06T08:49:37+0100",
            "1994-13-06T08:49:37Z",
            "1994-11-31T08:49:37Z",
            "2023-02-29T00:00:00Z",
            "1994-11-06T24:00:00Z",
            "1994-11-06T08:60:00Z",
            "1994-11-06T08:49:61Z",
            "1994-11-06T08:49:37.Z",
            "1994-11-06T08:49:37Zjunk",
            "1994-11-06T08:49:37+24:00",
            "1969-12-31T23:59:59Z",
            "1970-01-01T00:30:00+01:00",
            "+1994-11-06T08:49:37Z",
            "1994-11-06T08:49:37\u{e9}Z",
        ] {
            assert_eq!(t(bad), None, "{bad}");
        }
        assert_eq!(
            t(&format!("1994-11-06T08:49:37.{}Z", "1".repeat(100))),
            None
        );
        assert_eq!(t("9999-12-31T23:59:59Z"), Some(at(253_402_300_799)));
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
