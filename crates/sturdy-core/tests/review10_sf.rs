//! Review of structured-field parameters past the 16-key index (RFC 9651 §4.2.3.2: a repeated
//! key overwrites the value in place, so it keeps its first position and its last value), run
//! through the public parsers: `sf`, `RateLimit`, `RateLimit-Policy`.

use http::{HeaderMap, HeaderName, HeaderValue};
use proptest::prelude::*;
use sturdy_core::headers::sf::{self, BareItem, Member};
use sturdy_core::headers::{RateLimitItem, RateLimitPolicy};

fn headers(name: &str, values: &[&str]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for v in values {
        h.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    h
}

/// The RFC's algorithm, naively: overwrite in place, else append.
fn model(pairs: &[(String, i64)]) -> Vec<(String, BareItem)> {
    let mut out: Vec<(String, BareItem)> = Vec::new();
    for (k, v) in pairs {
        match out.iter_mut().find(|(ok, _)| ok == k) {
            Some(slot) => slot.1 = BareItem::Integer(*v),
            None => out.push((k.clone(), BareItem::Integer(*v))),
        }
    }
    out
}

fn serialize(pairs: &[(String, i64)]) -> String {
    pairs.iter().map(|(k, v)| format!(";{k}={v}")).collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// Keys from a small alphabet so repeats are common, 0 to 80 parameters so the index is
    /// built at every point of a sequence: item, list member, inner list and inner item all keep
    /// first position and last value, as the model does.
    #[test]
    fn parameters_match_the_rfc_model(
        keys in prop::collection::vec((0u8..30, -999i64..999), 0..80),
    ) {
        let pairs: Vec<(String, i64)> =
            keys.iter().map(|(k, v)| (format!("k{k}"), *v)).collect();
        let want = model(&pairs);
        let p = serialize(&pairs);
        let (item, params) = sf::parse_item(format!("tok{p}").as_bytes()).unwrap();
        prop_assert_eq!(item, BareItem::Token("tok".into()));
        prop_assert_eq!(&params, &want);
        let list = sf::parse_list([format!("a{p}, (b{p} c);x=1{p}").as_bytes()]).unwrap();
        prop_assert_eq!(list[0].params(), &want);
        match &list[1] {
            Member::InnerList(items, outer) => {
                prop_assert_eq!(&items[0].1, &want);
                prop_assert!(items[1].1.is_empty());
                let mut with_x = vec![("x".to_owned(), 1)];
                with_x.extend(pairs.iter().cloned());
                prop_assert_eq!(outer, &model(&with_x));
            }
            Member::Item(..) => prop_assert!(false, "an inner list"),
        }
    }
}

/// A key repeated on each side of the threshold: seen once among the first 16, again as the
/// 17th distinct key is added, and after.
#[test]
fn keys_repeated_across_the_threshold() {
    for first in 0..20 {
        for again in [15usize, 16, 17, 18, 40] {
            let mut pairs: Vec<(String, i64)> =
                (0..again).map(|n| (format!("d{n}"), n as i64)).collect();
            pairs.insert(first.min(pairs.len()), ("r".into(), 1));
            pairs.push(("r".into(), 2));
            pairs.push((format!("d{first}"), -1));
            pairs.push(("r".into(), 3));
            let (_, params) = sf::parse_item(format!("x{}", serialize(&pairs)).as_bytes()).unwrap();
            assert_eq!(params, model(&pairs), "r at {first}, {again} keys");
            let r = params.iter().position(|(k, _)| k == "r").unwrap();
            assert_eq!(r, first.min(again), "first position kept");
            assert_eq!(params[r].1, BareItem::Integer(3), "last value kept");
        }
    }
}

/// The STANDARDS.md §5.1 vectors, padded with 20 vendor parameters before and after (so every
/// lookup goes through the index), and with their own keys repeated: what they mean must not
/// change.
#[test]
fn ratelimit_vectors_padded_past_the_index() {
    let pad: String = (0..20).map(|n| format!(";x-v{n}=?1")).collect();
    for v in [
        r#""burst";q=100;w=60,"daily";q=1000;w=86400"#,
        r#""default";q=100;w=10"#,
        r#""permin";q=50;w=60,"perhr";q=1000;w=3600"#,
        r#""peruser";q=100;w=60;pk=:cHsdsRa894==:"#,
        r#""peruser";q=65535;qu="content-bytes";w=10;pk=:sdfjLJUOUH==:"#,
        r#""somepolicy";q=10000;w=1000"#,
    ] {
        let plain = RateLimitPolicy::from_headers(&headers("ratelimit-policy", &[v])).unwrap();
        let padded_v = pad_members(v, &pad);
        let padded =
            RateLimitPolicy::from_headers(&headers("ratelimit-policy", &[&padded_v])).unwrap();
        assert_eq!(plain, padded, "{padded_v}");
        // q given first as 7, then past the index as the vector says: the last wins.
        let again = pad_members(v, &format!(";q=7{pad}"));
        let again = RateLimitPolicy::from_headers(&headers("ratelimit-policy", &[&again]));
        assert_eq!(again.map(|p| p.len()), Ok(plain.len()));
    }
    for v in [
        r#""default";r=50;t=30"#,
        r#""default";r=999;pk=:dHJpYWwxMjEzMjM=:"#,
        r#""default";r=300000000;t=60;pk=:QXBwLTk5OQ==:"#,
        r#""default";r=0;t=50"#,
        r#""problemPolicy";r=0;t=10"#,
        r#""somepolicy";r=10000;t=10"#,
    ] {
        let plain = RateLimitItem::from_headers(&headers("ratelimit", &[v])).unwrap();
        let padded_v = pad_members(v, &pad);
        let padded = RateLimitItem::from_headers(&headers("ratelimit", &[&padded_v])).unwrap();
        assert_eq!(plain, padded, "{padded_v}");
        // r first as 1, the vector's r after 20 other keys: the vector's value wins.
        let name_end = v.find(';').unwrap();
        let again = format!("{};r=1{pad}{}", &v[..name_end], &v[name_end..]);
        let again = RateLimitItem::from_headers(&headers("ratelimit", &[&again])).unwrap();
        assert_eq!(plain, again, "r repeated across the index");
    }
}

/// Each list member gets `pad` after its name (its string) and before its own parameters.
fn pad_members(v: &str, pad: &str) -> String {
    v.split(',')
        .map(|m| {
            let end = m.find(';').unwrap_or(m.len());
            format!("{}{pad}{}", &m[..end], &m[end..])
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// The Idempotency-Key and date vectors (§4.1, §8.3) with more than 16 parameters: the item is
/// unchanged.
#[test]
fn items_with_many_parameters() {
    let pad: String = (0..40).map(|n| format!(";p{}={n}", n % 23)).collect();
    for (v, want) in [
        (
            "\"8e03978e-40d5-43e8-bc93-6894a57f9324\"",
            BareItem::String("8e03978e-40d5-43e8-bc93-6894a57f9324".into()),
        ),
        (
            "\"clkyoesmbgybucifusbbtdsbohtyuuwz\"",
            BareItem::String("clkyoesmbgybucifusbbtdsbohtyuuwz".into()),
        ),
        ("@1688169599", BareItem::Date(1_688_169_599)),
        ("@-62135596800", BareItem::Date(-62_135_596_800)),
    ] {
        let (item, params) = sf::parse_item(format!("{v}{pad}").as_bytes()).unwrap();
        assert_eq!(item, want);
        assert_eq!(params.len(), 23);
        assert_eq!(params[0], ("p0".to_owned(), BareItem::Integer(23)));
        assert_eq!(params[22], ("p22".to_owned(), BareItem::Integer(22)));
    }
}

/// Linear time on hostile parameter lists: distinct keys, one key repeated, keys cycling
/// through a set larger than the threshold, long keys. Four times the input must cost well under
/// sixteen times the time (quadratic); the bound is generous for a loaded machine.
#[test]
fn hostile_parameters_cost_linear_time() {
    let shapes: [(&str, fn(usize) -> String); 4] = [
        ("distinct", |n| (0..n).map(|i| format!(";k{i}")).collect()),
        ("repeated", |n| (0..n).map(|_| ";k=1").collect()),
        ("cycling", |n| {
            (0..n).map(|i| format!(";k{}=1", i % 1000)).collect()
        }),
        ("long keys", |n| {
            (0..n / 50)
                .map(|i| format!(";{}{i}", "k".repeat(200)))
                .collect()
        }),
    ];
    for (what, make) in shapes {
        let small = format!("\"d\";r=1{}", make(20_000));
        let large = format!("\"d\";r=1{}", make(80_000));
        let run = |s: &str| {
            let h = headers("ratelimit", &[s]);
            let r = RateLimitItem::from_headers(&h).unwrap();
            assert_eq!(r[0].remaining, 1);
        };
        run(&small);
        // The fastest of many runs: a run that other threads preempted only ever takes longer.
        let ts = crate::cost_common::fastest(3, || run(&small));
        let tl = crate::cost_common::fastest(3, || run(&large));
        let ratio = tl.as_secs_f64() / ts.as_secs_f64().max(1e-6);
        assert!(
            ratio < 10.0,
            "{what}: 4x the input cost {ratio:.1}x the time ({ts:?} -> {tl:?})"
        );
    }
}

/// RFC 9651 §3.3.8 adds Display Strings (`%"..."`), and the RateLimit draft allows any other
/// parameter ("can be regarded as comments"): a field whose vendor parameter is a Display String
/// is valid, and its `r` must be read, not the whole field dropped as malformed.
#[test]
fn a_display_string_parameter_is_valid() {
    let h = headers("ratelimit", &[r#""default";r=5;t=9;note=%"caf%c3%a9""#]);
    let r = RateLimitItem::from_headers(&h).map_err(|e| e.to_string());
    assert_eq!(r.map(|r| r[0].remaining), Ok(5));
    assert!(sf::parse_item(br#"%"f%c3%bc%c3%bc""#).is_ok());
}
