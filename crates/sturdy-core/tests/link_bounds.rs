//! `Link` parsing costs memory linear in the header's size, with a bound on links and parameters.

use std::collections::HashSet;

use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use sturdy_core::headers::{next_link, parse_link, Link, MAX_LINKS, MAX_LINK_PARAMS};

const BASE: &str = "http://h.example/dir/page";

fn link_headers(values: &[String]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for v in values {
        h.append(http::header::LINK, HeaderValue::from_str(v).unwrap());
    }
    h
}

/// What the parsed links hold, counting each shared allocation once (by address): the number of
/// strings and their total size in bytes.
fn footprint(links: &[Link]) -> (usize, usize) {
    let mut targets = HashSet::new();
    let mut param_lists = HashSet::new();
    let (mut strings, mut bytes) = (0, 0);
    for l in links {
        strings += 1;
        bytes += l.rel().len();
        if targets.insert(l.target().as_ptr()) {
            strings += 1;
            bytes += l.target().len();
        }
        if param_lists.insert(l.params().as_ptr()) {
            for (k, v) in l.params() {
                strings += 2;
                bytes += k.len() + v.len();
            }
        }
    }
    (strings, bytes)
}

/// The reported worst case: one link-value with 1,000 relation types and 1,000 parameters, 8,917
/// bytes in all, which used to give 1,000 links holding 1,000 parameters each.
fn thousand_by_thousand() -> String {
    let rels: Vec<String> = (0..1_000).map(|i| format!("r{i}")).collect();
    let value = format!(
        "<https://h.example/x>;rel=\"{}\"{}",
        rels.join(" "),
        ";p=1".repeat(1_000)
    );
    assert_eq!(value.len(), 8_917);
    value
}

#[test]
fn a_thousand_relation_types_by_a_thousand_parameters_no_longer_costs_a_million_strings() {
    let header = thousand_by_thousand();
    let links = parse_link(&link_headers(std::slice::from_ref(&header)), BASE);
    assert_eq!(links.len(), MAX_LINKS, "links stop at the bound");
    assert_eq!(links[0].rel(), "r0");
    assert_eq!(links[MAX_LINKS - 1].rel(), format!("r{}", MAX_LINKS - 1));
    for l in &links {
        assert_eq!(l.params().len(), MAX_LINK_PARAMS);
        assert_eq!(l.target(), "https://h.example/x");
    }
    // One copy of the target and of the parameters, shared by every relation type.
    let (strings, bytes) = footprint(&links);
    assert_eq!(strings, MAX_LINKS + 1 + 2 * MAX_LINK_PARAMS);
    assert!(bytes <= header.len(), "{bytes} bytes from {}", header.len());
    // Were the parameters cloned per relation type, the same header would hold
    // MAX_LINKS * MAX_LINK_PARAMS * 2 strings.
    let cloned: usize = links.iter().map(|l| 2 * l.params().len()).sum();
    assert_eq!(cloned, 2 * MAX_LINKS * MAX_LINK_PARAMS);
    assert!(strings * 10 < cloned);
}

#[test]
fn the_bounds_hold_across_field_lines() {
    let line = "<a>; rel=\"x y z\"".to_owned();
    let links = parse_link(&link_headers(&vec![line; 200]), BASE);
    assert_eq!(links.len(), MAX_LINKS);
    // `parse_link` keeps the first MAX_LINKS; `next_link` reads past them for the next link.
    let mut values = vec!["<a>; rel=other".to_owned(); MAX_LINKS];
    values.push("<b>; rel=next".to_owned());
    assert!(parse_link(&link_headers(&values), BASE)
        .iter()
        .all(|l| l.rel() == "other"));
    assert_eq!(
        next_link(&link_headers(&values), BASE).as_deref(),
        Some("http://h.example/dir/b")
    );
}

#[test]
fn rel_is_found_after_many_parameters() {
    let value = format!("<n>{}; rel=next; title=t", ";p".repeat(MAX_LINK_PARAMS * 4));
    let links = parse_link(&link_headers(&[value]), BASE);
    assert_eq!(links.len(), 1);
    assert_eq!(links[0].rel(), "next");
    assert_eq!(links[0].params().len(), MAX_LINK_PARAMS);
    assert_eq!(
        links[0].title(),
        None,
        "parameters past the bound are skipped"
    );
}

/// A header of many link-values, each with many relation types and parameters.
fn big_header() -> impl Strategy<Value = Vec<String>> {
    let link_value = (
        "[a-z/.?=&]{0,40}",
        proptest::collection::vec("[a-z0-9.-]{1,6}", 0..300),
        proptest::collection::vec(("[a-z*]{1,5}", "[a-zA-Z0-9%' ]{0,12}"), 0..300),
        any::<bool>(),
    )
        .prop_map(|(target, rels, params, quoted)| {
            let mut v = format!("<{target}>");
            if !rels.is_empty() {
                v.push_str(&format!("; rel=\"{}\"", rels.join(" ")));
            }
            for (k, val) in params {
                if quoted {
                    v.push_str(&format!("; {k}=\"{val}\""));
                } else {
                    v.push_str(&format!("; {k}={}", val.trim()));
                }
            }
            v
        });
    proptest::collection::vec(proptest::collection::vec(link_value, 1..12), 1..4).prop_map(
        |lines| {
            lines
                .into_iter()
                .map(|values| values.join(", "))
                .collect::<Vec<_>>()
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn memory_is_linear_in_the_header_size(lines in big_header()) {
        let input: usize = lines.iter().map(String::len).sum();
        let links = parse_link(&link_headers(&lines), BASE);
        prop_assert!(links.len() <= MAX_LINKS);
        for l in &links {
            prop_assert!(l.params().len() <= MAX_LINK_PARAMS);
        }
        let (strings, bytes) = footprint(&links);
        // Every string comes from at least one byte of input, except the resolved target (one
        // per link-value); resolution adds at most the base (for the target and the anchor).
        let values = lines.iter().map(|l| l.matches('<').count()).sum::<usize>();
        prop_assert!(strings <= input + values, "{strings} strings from {input} bytes");
        prop_assert!(
            bytes <= input + 2 * values * BASE.len(),
            "{bytes} bytes from {input} bytes"
        );
    }
}
