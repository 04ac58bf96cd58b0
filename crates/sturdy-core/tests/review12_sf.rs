//! Review of Display Strings (RFC 9651 §3.3.8, parsed by §4.2.10) in structured fields, and of
//! the public parsers that read structured fields (`RateLimit`, `RateLimit-Policy`) when a
//! Display String shows up where a string, token or date is expected.

use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use sturdy_core::headers::sf::{self, BareItem, Member};
use sturdy_core::headers::{RateLimitItem, RateLimitPolicy};

fn headers(name: &str, values: &[&[u8]]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for v in values {
        h.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_bytes(v).unwrap(),
        );
    }
    h
}

fn item(s: &[u8]) -> Result<BareItem, sf::SfError> {
    sf::parse_item(s).map(|(i, _)| i)
}

fn display(s: &str) -> BareItem {
    BareItem::DisplayString(s.to_owned())
}

#[test]
fn well_formed_display_strings_decode() {
    assert_eq!(item(br#"%"foo bar""#), Ok(display("foo bar")));
    assert_eq!(item(br#"%"""#), Ok(display("")));
    assert_eq!(item(br#"%"f%c3%bc%c3%bcbar""#), Ok(display("füübar")));
    // An escaped quote and an escaped percent sign are text.
    assert_eq!(item(br#"%"a%22b%25c""#), Ok(display("a\"b%c")));
    // A backslash is not an escape in a Display String: it is itself.
    assert_eq!(item(br#"%"a\b""#), Ok(display("a\\b")));
    // Every printable ASCII character other than `"` and `%` stands for itself.
    let printable: String = (0x20u8..=0x7e)
        .filter(|c| *c != b'"' && *c != b'%')
        .map(char::from)
        .collect();
    let field = format!("%\"{printable}\"");
    assert_eq!(item(field.as_bytes()), Ok(display(&printable)));
    // A byte order mark is kept, and a four-byte character decodes.
    assert_eq!(item(br#"%"%ef%bb%bfx""#), Ok(display("\u{feff}x")));
    assert_eq!(item(br#"%"%f0%9f%98%80""#), Ok(display("😀")));
    // With parameters, and as a parameter value.
    assert_eq!(
        sf::parse_item(br#"%"x";a=%"y";b"#),
        Ok((
            display("x"),
            vec![
                ("a".to_owned(), display("y")),
                ("b".to_owned(), BareItem::Boolean(true))
            ]
        ))
    );
    // In a list and in an inner list.
    assert_eq!(
        sf::parse_list([&br#"%"a", (%"b" c)"#[..]]),
        Ok(vec![
            Member::Item(display("a"), vec![]),
            Member::InnerList(
                vec![
                    (display("b"), vec![]),
                    (BareItem::Token("c".to_owned()), vec![])
                ],
                vec![]
            ),
        ])
    );
}

#[test]
fn malformed_display_strings_fail() {
    let bad: &[&[u8]] = &[
        // Uppercase hex.
        br#"%"f%C3%BCbar""#,
        br#"%"%Aa""#,
        br#"%"%aA""#,
        // Not hex at all, or one digit.
        br#"%"%x1""#,
        br#"%"%g0""#,
        br#"%"%1""#,
        br#"%"% 1""#,
        br#"%"%-1""#,
        br#"%"%+f""#,
        // Not UTF-8: a lone continuation byte, a truncated sequence, an overlong form, a
        // surrogate, past U+10FFFF.
        br#"%"%80""#,
        br#"%"%c3""#,
        br#"%"%c3%28""#,
        br#"%"%c0%af""#,
        br#"%"%ed%a0%80""#,
        br#"%"%f4%90%80%80""#,
        // Outside 0x20-0x7e.
        b"%\"a\tb\"",
        b"%\"a\x7fb\"",
        b"%\"a\x1fb\"",
        b"%\"a\xc3\xbcb\"",
        // Unterminated, or `%` at the very end.
        br#"%"abc"#,
        br#"%""#,
        b"%",
        br#"%"abc%"#,
        br#"%"abc%a"#,
        br#"%"abc%"""#,
        // Not `%"`: single quotes, unquoted, a space between.
        b"%'foo'",
        b"%foo",
        br#"% "foo""#,
        br#"%%"foo""#,
        // A quote inside ends the string: what follows is garbage.
        br#"%"abc"def""#,
        br#"%"a"b"#,
    ];
    for b in bad {
        let got = item(b);
        assert!(
            got.is_err(),
            "{:?} parsed as {got:?}",
            String::from_utf8_lossy(b)
        );
        let listed = sf::parse_list([*b]);
        assert!(
            listed.is_err(),
            "{:?} as a list parsed as {listed:?}",
            String::from_utf8_lossy(b)
        );
        // As a parameter value too.
        let mut p = b"\"ok\";p=".to_vec();
        p.extend_from_slice(b);
        let param = sf::parse_item(&p);
        assert!(
            param.is_err(),
            "{:?} parsed as {param:?}",
            String::from_utf8_lossy(&p)
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Any text, percent-encoded the RFC's way (§4.1.11: `%`, `"` and bytes outside 0x20-0x7e
    /// encoded, lowercase), reads back as itself; the same with uppercase hex fails whenever
    /// an escape holds a letter.
    #[test]
    fn any_text_round_trips(s in "\\PC{0,24}") {
        let mut enc = String::from("%\"");
        let mut upper = String::from("%\"");
        let mut letters = false;
        for b in s.bytes() {
            if b == b'%' || b == b'"' || !(0x20..=0x7e).contains(&b) {
                let e = format!("%{b:02x}");
                letters |= e.bytes().any(|c| c.is_ascii_alphabetic() && c != b'%');
                enc.push_str(&e);
                upper.push_str(&format!("%{b:02X}"));
            } else {
                enc.push(char::from(b));
                upper.push(char::from(b));
            }
        }
        enc.push('"');
        upper.push('"');
        prop_assert_eq!(item(enc.as_bytes()), Ok(display(&s)));
        if letters {
            prop_assert!(item(upper.as_bytes()).is_err());
        }
    }

    /// Arbitrary bytes after `%"` never panic, and whatever parses is valid UTF-8 text that
    /// came from a well-formed string.
    #[test]
    fn arbitrary_bytes_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..40)) {
        let mut b = b"%\"".to_vec();
        b.extend_from_slice(&tail);
        if let Ok(BareItem::DisplayString(s)) = item(&b) {
            // Parsed: so the input ended with the closing quote right after the text, but for
            // trailing spaces, which a parser discards (RFC 9651 section 4.2).
            let end = b.iter().rposition(|c| *c != b' ').map_or(0, |i| i + 1);
            prop_assert_eq!(b[..end].last(), Some(&b'"'));
            prop_assert!(!s.is_empty() || end == 3);
        }
        let _ = sf::parse_list([&b[..]]);
    }
}

#[test]
fn ratelimit_with_a_display_string_parameter_is_kept() {
    // The changelog: a RateLimit header with a Display String parameter was thrown away whole.
    let h = headers("ratelimit", &[br#""default";r=5;t=30;note=%"caf%c3%a9""#]);
    let got = RateLimitItem::from_headers(&h).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].policy, "default");
    assert_eq!(got[0].remaining, 5);
    assert_eq!(got[0].reset, Some(std::time::Duration::from_secs(30)));
    let h = headers(
        "ratelimit-policy",
        &[br#""burst";q=100;w=60;d=%"100 per minute""#],
    );
    let got = RateLimitPolicy::from_headers(&h).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].name.as_str(), got[0].quota), ("burst", 100));
}

#[test]
fn a_display_string_where_a_string_or_integer_is_expected_is_refused() {
    // Policy names are sf-strings; a Display String is not one.
    for v in [
        &br#"%"default";r=5"#[..],
        br#""default";r=%"5""#,
        br#""default";r=5;t=%"30""#,
    ] {
        let got = RateLimitItem::from_headers(&headers("ratelimit", &[v]));
        assert!(got.is_err(), "{:?}: {got:?}", String::from_utf8_lossy(v));
    }
    for v in [
        &br#"%"burst";q=100"#[..],
        br#""burst";q=%"100""#,
        br#""burst";q=100;qu=%"requests""#,
        br#""burst";q=100;w=%"60""#,
    ] {
        let got = RateLimitPolicy::from_headers(&headers("ratelimit-policy", &[v]));
        assert!(got.is_err(), "{:?}: {got:?}", String::from_utf8_lossy(v));
    }
    // A partition key is a byte sequence: a Display String there is no key.
    let got =
        RateLimitItem::from_headers(&headers("ratelimit", &[br#""d";r=1;pk=%"abc""#])).unwrap();
    assert_eq!(got[0].partition_key, None);
}

#[test]
fn a_malformed_display_string_drops_the_whole_field_without_panic() {
    for v in [
        &br#""default";r=5, "other";r=1;n=%"%C3%A9""#[..],
        br#""default";r=5;n=%"unterminated"#,
        br#""default";r=5;n=%"%"#,
        br#""default";r=5;n=%"%c3""#,
    ] {
        let got = RateLimitItem::from_headers(&headers("ratelimit", &[v]));
        assert!(got.is_err(), "{:?}: {got:?}", String::from_utf8_lossy(v));
        let got = RateLimitPolicy::from_headers(&headers("ratelimit-policy", &[v]));
        assert!(got.is_err());
    }
    // Split over two lines: the joined field is one list; the Display String is whole in one.
    let got = RateLimitItem::from_headers(&headers(
        "ratelimit",
        &[br#""a";r=1;n=%"x y""#, br#""b";r=2"#],
    ))
    .unwrap();
    assert_eq!(got.len(), 2);
}

/// The case a random run of `arbitrary_bytes_never_panic` found: trailing spaces after a
/// Display String are discarded (RFC 9651 section 4.2), so `%"" ` is the empty text.
#[test]
fn a_display_string_then_trailing_spaces_is_the_text() {
    assert_eq!(item(b"%\"\" "), Ok(BareItem::DisplayString(String::new())));
    assert_eq!(item(b"%\"a\"  "), Ok(BareItem::DisplayString("a".into())));
}
