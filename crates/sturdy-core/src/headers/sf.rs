//! The part of Structured Field Values (RFC 9651) that sturdy's headers use: Items and Lists with
//! parameters (`RateLimit`, `RateLimit-Policy`, `Idempotency-Key`, `Deprecation`).
//!
//! Byte sequences are decoded leniently, as RFC 9651 §4.2.7 asks: non-zero pad bits and missing
//! `=` padding are accepted.

use std::collections::HashMap;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;

/// A bare item. Non-exhaustive: RFC 9651 may grow new types, as it grew Dates and Display
/// Strings.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum BareItem {
    /// `42`, `-7` (at most 15 digits).
    Integer(i64),
    /// `4.5` (at most 12 integer and 3 fraction digits).
    Decimal(f64),
    /// `"text"`.
    String(String),
    /// `name`, `*foo`, `a:b/c`.
    Token(String),
    /// `:base64:`.
    ByteSeq(Vec<u8>),
    /// `?1`, `?0`.
    Boolean(bool),
    /// `@1659578233`, seconds since the epoch.
    Date(i64),
    /// `%"caf%c3%a9"`, a Display String (RFC 9651 §3.3.8): Unicode text, percent-encoded UTF-8.
    DisplayString(String),
}

impl BareItem {
    /// The integer, if this is one.
    pub fn as_integer(&self) -> Option<i64> {
        match self {
            Self::Integer(i) => Some(*i),
            _ => None,
        }
    }

    /// The string or token text, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) | Self::Token(s) => Some(s),
            _ => None,
        }
    }
}

/// Parameters, in order; a repeated key keeps its last value (RFC 9651 §4.2.3.2).
pub type Params = Vec<(String, BareItem)>;

/// An item or inner list with its parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum Member {
    /// A bare item.
    Item(BareItem, Params),
    /// `(a b c);p=1`.
    InnerList(Vec<(BareItem, Params)>, Params),
}

impl Member {
    /// The member's parameters.
    pub fn params(&self) -> &Params {
        match self {
            Self::Item(_, p) | Self::InnerList(_, p) => p,
        }
    }

    /// A parameter by name.
    pub fn param(&self, key: &str) -> Option<&BareItem> {
        self.params().iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }
}

/// Why a structured field did not parse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SfError(&'static str);

impl std::fmt::Display for SfError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for SfError {}

/// Parses a List; several field lines are joined with `,` by the caller (or pass them all).
///
/// # Errors
/// [`SfError`] on any syntax error: RFC 9651 says the whole field is then ignored. Members past
/// the first [`MAX_LIST_MEMBERS`] are not read (nor checked).
pub fn parse_list<'a>(lines: impl IntoIterator<Item = &'a [u8]>) -> Result<Vec<Member>, SfError> {
    let mut joined = Vec::new();
    for (i, l) in lines.into_iter().enumerate() {
        if i > 0 {
            joined.push(b',');
        }
        joined.extend_from_slice(l);
    }
    let mut p = Parser { s: &joined, i: 0 };
    p.skip_sp();
    let mut out = Vec::new();
    if p.eof() {
        return Ok(out);
    }
    loop {
        // RFC 9651 asks parsers to take lists of at least 1,024 members; past a few times that,
        // the rest of a peer's field is not read, so that each member does not cost an
        // allocation of its own.
        if out.len() == MAX_LIST_MEMBERS {
            return Ok(out);
        }
        out.push(p.member()?);
        p.skip_ows();
        if p.eof() {
            return Ok(out);
        }
        p.expect(b',', "expected a comma between list members")?;
        p.skip_ows();
        if p.eof() {
            return Err(SfError("trailing comma"));
        }
    }
}

/// The most members of a List that [`parse_list`] reads (RFC 9651 asks for at least 1,024);
/// the rest of the field is left unread.
pub const MAX_LIST_MEMBERS: usize = 4_096;

/// Parses an Item field value.
///
/// # Errors
/// [`SfError`] on any syntax error.
pub fn parse_item(value: &[u8]) -> Result<(BareItem, Params), SfError> {
    let mut p = Parser { s: value, i: 0 };
    p.skip_sp();
    let item = p.bare_item()?;
    let params = p.params()?;
    p.skip_sp();
    if !p.eof() {
        return Err(SfError("unexpected characters after the item"));
    }
    Ok((item, params))
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl Parser<'_> {
    fn eof(&self) -> bool {
        self.i >= self.s.len()
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn skip_sp(&mut self) {
        while self.peek() == Some(b' ') {
            self.i += 1;
        }
    }

    fn skip_ows(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t')) {
            self.i += 1;
        }
    }

    fn expect(&mut self, c: u8, msg: &'static str) -> Result<(), SfError> {
        if self.peek() == Some(c) {
            self.i += 1;
            Ok(())
        } else {
            Err(SfError(msg))
        }
    }

    fn member(&mut self) -> Result<Member, SfError> {
        if self.peek() == Some(b'(') {
            self.i += 1;
            let mut items = Vec::new();
            loop {
                self.skip_sp();
                if self.peek() == Some(b')') {
                    self.i += 1;
                    break;
                }
                let item = self.bare_item()?;
                let params = self.params()?;
                items.push((item, params));
                match self.peek() {
                    Some(b' ' | b')') => {}
                    _ => return Err(SfError("inner list members must be separated by spaces")),
                }
            }
            let params = self.params()?;
            Ok(Member::InnerList(items, params))
        } else {
            let item = self.bare_item()?;
            let params = self.params()?;
            Ok(Member::Item(item, params))
        }
    }

    fn params(&mut self) -> Result<Params, SfError> {
        let mut out: Params = Vec::new();
        // A repeated key keeps its last value. Past a few keys they are found through an index:
        // a scan of the keys before each new one would make a header of many distinct keys
        // cost quadratic time (a peer chooses the header).
        let mut index: Option<HashMap<String, usize>> = None;
        while self.peek() == Some(b';') {
            self.i += 1;
            self.skip_sp();
            let key = self.key()?;
            let value = if self.peek() == Some(b'=') {
                self.i += 1;
                self.bare_item()?
            } else {
                BareItem::Boolean(true)
            };
            let found = match &index {
                Some(ix) => ix.get(&key).copied(),
                None => out.iter().position(|(k, _)| *k == key),
            };
            match found {
                Some(at) => out[at].1 = value,
                None => {
                    if let Some(ix) = &mut index {
                        ix.insert(key.clone(), out.len());
                    }
                    out.push((key, value));
                    if index.is_none() && out.len() > 16 {
                        index = Some(
                            out.iter()
                                .enumerate()
                                .map(|(at, (k, _))| (k.clone(), at))
                                .collect(),
                        );
                    }
                }
            }
        }
        Ok(out)
    }

    fn key(&mut self) -> Result<String, SfError> {
        let start = self.i;
        match self.peek() {
            Some(c) if c.is_ascii_lowercase() || c == b'*' => self.i += 1,
            _ => return Err(SfError("a key must start with a lowercase letter or '*'")),
        }
        while let Some(c) = self.peek() {
            if c.is_ascii_lowercase()
                || c.is_ascii_digit()
                || matches!(c, b'_' | b'-' | b'.' | b'*')
            {
                self.i += 1;
            } else {
                break;
            }
        }
        Ok(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    fn bare_item(&mut self) -> Result<BareItem, SfError> {
        match self.peek() {
            Some(b'-' | b'0'..=b'9') => self.number(),
            Some(b'"') => self.string(),
            Some(b':') => self.bytes(),
            Some(b'?') => {
                self.i += 1;
                let v = match self.peek() {
                    Some(b'1') => true,
                    Some(b'0') => false,
                    _ => return Err(SfError("a boolean is ?0 or ?1")),
                };
                self.i += 1;
                Ok(BareItem::Boolean(v))
            }
            Some(b'@') => {
                self.i += 1;
                match self.number()? {
                    BareItem::Integer(i) => Ok(BareItem::Date(i)),
                    _ => Err(SfError("a date is a whole number of seconds")),
                }
            }
            Some(b'%') => self.display_string(),
            Some(c) if c.is_ascii_alphabetic() || c == b'*' => Ok(self.token()),
            _ => Err(SfError("expected an item")),
        }
    }

    /// RFC 9651 §4.2.10: `%"`, printable ASCII or `%` and two lowercase hex digits, `"`; the
    /// bytes must be UTF-8.
    fn display_string(&mut self) -> Result<BareItem, SfError> {
        self.i += 1;
        if self.peek() != Some(b'"') {
            return Err(SfError("a display string starts with %\""));
        }
        self.i += 1;
        let mut bytes = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                return Err(SfError("a display string is not closed"));
            };
            self.i += 1;
            match c {
                b'"' => break,
                b'%' => {
                    let hex = |b: Option<u8>| match b {
                        Some(d @ b'0'..=b'9') => Some(d - b'0'),
                        Some(d @ b'a'..=b'f') => Some(d - b'a' + 10),
                        _ => None,
                    };
                    let (Some(hi), Some(lo)) =
                        (hex(self.peek()), hex(self.s.get(self.i + 1).copied()))
                    else {
                        return Err(SfError(
                            "a display string's % takes two lowercase hex digits",
                        ));
                    };
                    self.i += 2;
                    bytes.push(hi << 4 | lo);
                }
                0x20..=0x7e => bytes.push(c),
                _ => return Err(SfError("a display string holds printable ASCII only")),
            }
        }
        String::from_utf8(bytes)
            .map(BareItem::DisplayString)
            .map_err(|_| SfError("a display string is not UTF-8"))
    }

    fn number(&mut self) -> Result<BareItem, SfError> {
        let neg = self.peek() == Some(b'-');
        if neg {
            self.i += 1;
        }
        let start = self.i;
        let mut dot = None;
        while let Some(c) = self.peek() {
            if c.is_ascii_digit() {
                self.i += 1;
            } else if c == b'.' && dot.is_none() {
                dot = Some(self.i);
                self.i += 1;
            } else {
                break;
            }
        }
        let digits = &self.s[start..self.i];
        if digits.is_empty() || !digits[0].is_ascii_digit() {
            return Err(SfError("expected a digit"));
        }
        // Only ASCII digits and at most one '.' were consumed, so this is valid UTF-8.
        let text = std::str::from_utf8(digits).map_err(|_| SfError("expected a digit"))?;
        match dot {
            None => {
                if digits.len() > 15 {
                    return Err(SfError("an integer has at most 15 digits"));
                }
                let v: i64 = text.parse().map_err(|_| SfError("bad integer"))?;
                Ok(BareItem::Integer(if neg { -v } else { v }))
            }
            Some(d) => {
                let int_len = d - start;
                let frac_len = self.i - d - 1;
                if int_len > 12 || frac_len == 0 || frac_len > 3 {
                    return Err(SfError(
                        "a decimal has at most 12 integer and 3 fraction digits",
                    ));
                }
                let v: f64 = text.parse().map_err(|_| SfError("bad decimal"))?;
                Ok(BareItem::Decimal(if neg { -v } else { v }))
            }
        }
    }

    fn string(&mut self) -> Result<BareItem, SfError> {
        self.i += 1;
        let mut out = String::new();
        loop {
            match self.peek() {
                None => return Err(SfError("unterminated string")),
                Some(b'"') => {
                    self.i += 1;
                    return Ok(BareItem::String(out));
                }
                Some(b'\\') => {
                    self.i += 1;
                    match self.peek() {
                        Some(c @ (b'"' | b'\\')) => {
                            out.push(char::from(c));
                            self.i += 1;
                        }
                        _ => return Err(SfError("bad escape in string")),
                    }
                }
                Some(c @ 0x20..=0x7e) => {
                    out.push(char::from(c));
                    self.i += 1;
                }
                Some(_) => return Err(SfError("strings hold visible ASCII only")),
            }
        }
    }

    fn token(&mut self) -> BareItem {
        let start = self.i;
        self.i += 1;
        while let Some(c) = self.peek() {
            if is_tchar(c) || c == b':' || c == b'/' {
                self.i += 1;
            } else {
                break;
            }
        }
        BareItem::Token(String::from_utf8_lossy(&self.s[start..self.i]).into_owned())
    }

    fn bytes(&mut self) -> Result<BareItem, SfError> {
        self.i += 1;
        let start = self.i;
        while let Some(c) = self.peek() {
            if c == b':' {
                break;
            }
            if !(c.is_ascii_alphanumeric() || matches!(c, b'+' | b'/' | b'=')) {
                return Err(SfError("bad character in byte sequence"));
            }
            self.i += 1;
        }
        if self.eof() {
            return Err(SfError("unterminated byte sequence"));
        }
        let b64 = &self.s[start..self.i];
        self.i += 1;
        lenient_base64(b64)
            .map(BareItem::ByteSeq)
            .ok_or(SfError("bad base64 in byte sequence"))
    }
}

fn is_tchar(c: u8) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

/// Standard-alphabet base64 that accepts missing padding and non-zero trailing bits.
pub(crate) fn lenient_base64(b: &[u8]) -> Option<Vec<u8>> {
    const ENGINE: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        GeneralPurposeConfig::new()
            .with_decode_allow_trailing_bits(true)
            .with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    ENGINE.decode(b).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_is_read_up_to_the_most_members() {
        let at_most = vec!["a"; MAX_LIST_MEMBERS].join(",");
        assert_eq!(
            parse_list([at_most.as_bytes()]).unwrap().len(),
            MAX_LIST_MEMBERS
        );
        let past = vec!["a"; 100_000].join(",");
        assert_eq!(
            parse_list([past.as_bytes()]).unwrap().len(),
            MAX_LIST_MEMBERS
        );
    }

    #[test]
    fn dates_from_structured_field_tests() {
        for (s, v) in [
            ("@0", 0),
            ("@1659578233", 1_659_578_233),
            ("@-1659578233", -1_659_578_233),
            ("@2147483648", 2_147_483_648),
            ("@4294967296", 4_294_967_296),
            ("@253402214400", 253_402_214_400),
            ("@-62135596800", -62_135_596_800),
            ("@-0", 0),
        ] {
            assert_eq!(
                parse_item(s.as_bytes()).unwrap().0,
                BareItem::Date(v),
                "{s}"
            );
        }
        for s in [
            "@1659578233.12",
            "@1000000000000000",
            "@-1000000000000000",
            "@",
            "@-",
            "@ 12345678",
            "@abc",
        ] {
            assert!(parse_item(s.as_bytes()).is_err(), "{s}");
        }
    }

    #[test]
    fn strings() {
        assert_eq!(
            parse_item(br#""foo \"bar\" \\ baz""#).unwrap().0,
            BareItem::String(r#"foo "bar" \ baz"#.into())
        );
        for s in [
            "\"f\u{fc}\u{fc}\"",
            "\"a\tb\"",
            "\"a\nb\"",
            "'foo'",
            "\"foo",
            "\"foo \\,\"",
        ] {
            assert!(parse_item(s.as_bytes()).is_err(), "{s:?}");
        }
        assert_eq!(
            parse_item(b"\"8e03978e-40d5-43e8-bc93-6894a57f9324\"")
                .unwrap()
                .0,
            BareItem::String("8e03978e-40d5-43e8-bc93-6894a57f9324".into())
        );
    }

    #[test]
    fn byte_sequences_lenient() {
        let l = parse_list([&b"\"d\";pk=:dHJpYWwxMjEzMjM=:"[..]]).unwrap();
        assert_eq!(
            l[0].param("pk"),
            Some(&BareItem::ByteSeq(b"trial121323".to_vec()))
        );
        let l = parse_list([&b"\"d\";pk=:cHsdsRa894==:"[..]]).unwrap();
        assert!(matches!(l[0].param("pk"), Some(BareItem::ByteSeq(b)) if b.len() == 7));
        let l = parse_list([&b"\"d\";pk=:QXBwLTk5OQ:"[..]]).unwrap();
        assert_eq!(
            l[0].param("pk"),
            Some(&BareItem::ByteSeq(b"App-999".to_vec()))
        );
    }

    #[test]
    fn lists_and_inner_lists() {
        let l = parse_list([&b"a;x=1, (b c);y=?0,  4.5"[..], &b"tok/en:x"[..]]).unwrap();
        assert_eq!(l.len(), 4);
        assert!(matches!(&l[1], Member::InnerList(v, _) if v.len() == 2));
        assert!(parse_list([&b"a,"[..]]).is_err());
        assert!(parse_list([&b"a b"[..]]).is_err());
        assert_eq!(parse_list([&b""[..]]).unwrap(), vec![]);
    }
}
