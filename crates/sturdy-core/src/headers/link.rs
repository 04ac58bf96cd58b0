use std::fmt;
use std::sync::Arc;

use http::HeaderMap;

use super::uri::{resolve_reference, same_resource};

/// The most links [`parse_link`] returns for one response, all `Link` field lines together; each
/// relation type of a multi-type `rel` counts as one link. Parsing stops there.
pub const MAX_LINKS: usize = 100;

/// The most parameters (other than `rel`) kept for one link; later ones are skipped.
pub const MAX_LINK_PARAMS: usize = 32;

/// One link of an RFC 8288 `Link` header: a target, one relation type, and the other parameters.
///
/// A `rel` with several space-separated types gives one `Link` per type. Those links share one
/// copy of the target and the parameters (cloning a `Link` is cheap too), so the memory a header
/// costs is linear in its size.
#[derive(Clone)]
pub struct Link {
    value: Arc<LinkValue>,
    rel: String,
}

/// What the relation types of one link-value share.
#[derive(PartialEq, Eq)]
struct LinkValue {
    target: String,
    params: Vec<(String, String)>,
}

impl Link {
    /// The target, resolved against the request URI.
    pub fn target(&self) -> &str {
        &self.value.target
    }

    /// The relation type, lowercased (`next`, `prev`, or an extension URI).
    pub fn rel(&self) -> &str {
        &self.rel
    }

    /// The other parameters in order (at most [`MAX_LINK_PARAMS`]), names lowercased; a parameter
    /// without `=` has an empty value; `title*`-style values are decoded (RFC 8187); a relative
    /// `anchor` is resolved against the request URI.
    pub fn params(&self) -> &[(String, String)] {
        &self.value.params
    }

    /// A parameter by (lowercase) name.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params()
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The title, preferring `title*` over `title` as RFC 8288 asks.
    pub fn title(&self) -> Option<&str> {
        self.param("title*").or_else(|| self.param("title"))
    }
}

impl PartialEq for Link {
    fn eq(&self, other: &Self) -> bool {
        self.rel == other.rel && self.value == other.value
    }
}

impl Eq for Link {}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Link")
            .field("target", &self.value.target)
            .field("rel", &self.rel)
            .field("params", &self.value.params)
            .finish()
    }
}

/// Parses every `Link` field line (RFC 8288 §3, following the Appendix B algorithm): each line is
/// parsed on its own, and a malformed link ends its line (the links before it are kept, and the
/// next line is parsed). Empty list elements (`,,`, or a line of just `,`) are skipped, as RFC 9110
/// §5.6.1 asks of a recipient. Relative targets are resolved
/// against `request_uri`; a link without `rel` is dropped; a repeated `rel`, `media`, `title`,
/// `title*`, `type` or `anchor` keeps its first value.
///
/// A byte that is not UTF-8 is read as its percent-encoded form (`%FF`), so a target keeps the
/// bytes the server sent.
///
/// Bounds, whatever the header holds: at most [`MAX_LINKS`] links (parsing stops there) and
/// [`MAX_LINK_PARAMS`] parameters per link (later ones are skipped, but for a first `anchor`,
/// which says whose link it is and takes the last one's place); time and memory are linear
/// in the header's size, plus one copy of the request URI per kept link (its resolved target,
/// and its resolved `anchor` if it has one).
pub fn parse_link(headers: &HeaderMap, request_uri: &str) -> Vec<Link> {
    let mut out = Vec::new();
    for value in headers.get_all(http::header::LINK) {
        if parse_value(value.as_bytes(), request_uri, &mut out, None, &mut 0) == Line::Full {
            break;
        }
    }
    out
}

/// The target of the first `rel="next"` link, resolved against `request_uri`.
///
/// Unlike [`parse_link`], this reads past [`MAX_LINKS`] links (a page may list hundreds of
/// `item` links before its `next`): it keeps only the one link it looks for, so memory stays
/// bounded and time linear in the header's size. As there, a malformed link ends only its own
/// field line, as RFC 8288's algorithm does. A `next` link with an `anchor` that names another
/// resource (RFC 8288 §3.2: the link is then that resource's, not this page's) is passed over;
/// one that names the page (RFC 3986 normalization aside: the case of the scheme and host, a
/// default port, percent-encoded unreserved characters) or a fragment of it is followed. Each
/// one passed over costs a copy of the request URI, which a peer chooses too: once those copies
/// come to [`MAX_LINKS`] request URIs or 4 MiB, whichever is more, it looks no further and
/// returns `None`.
pub fn next_link(headers: &HeaderMap, request_uri: &str) -> Option<String> {
    let mut out = Vec::new();
    let mut passed = 0;
    for value in headers.get_all(http::header::LINK) {
        if parse_value(
            value.as_bytes(),
            request_uri,
            &mut out,
            Some("next"),
            &mut passed,
        ) == Line::Full
            || !out.is_empty()
        {
            break;
        }
    }
    out.into_iter().next().map(|l| l.value.target.clone())
}

/// How parsing one field line ended.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// At its end, or at a malformed link: the next line is parsed.
    Ended,
    /// [`MAX_LINKS`] links, or the link `only` names, were found (or links of that relation type
    /// passed over as another resource's cost [`passed_over_budget`]): nothing more is parsed.
    Full,
}

/// How many bytes of request URI [`next_link`] copies for links it passes over before it gives
/// up: [`MAX_LINKS`] request URIs or 4 MiB, whichever is more.
fn passed_over_budget(base: &str) -> usize {
    (MAX_LINKS * base.len()).max(4 << 20)
}

/// Appends the links of one field line to `out`; with `only`, just the first link of that
/// relation type whose context is this resource (the others are parsed past, not kept; `passed`
/// counts the bytes of request URI copied for those of that type passed over as another
/// resource's).
fn parse_value(
    bytes: &[u8],
    base: &str,
    out: &mut Vec<Link>,
    only: Option<&str>,
    passed: &mut usize,
) -> Line {
    let cap = if only.is_some() { 1 } else { MAX_LINKS };
    // A byte that is not UTF-8 is kept as its percent-encoded form, so a target holding one
    // names the bytes the server sent (U+FFFD would make another URI).
    let s = match std::str::from_utf8(bytes) {
        Ok(s) => std::borrow::Cow::Borrowed(s),
        Err(_) => {
            let mut s = String::with_capacity(bytes.len() + 8);
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            for chunk in bytes.utf8_chunks() {
                s.push_str(chunk.valid());
                for b in chunk.invalid() {
                    s.push('%');
                    s.push(char::from(HEX[usize::from(b >> 4)]));
                    s.push(char::from(HEX[usize::from(b & 0xf)]));
                }
            }
            std::borrow::Cow::Owned(s)
        }
    };
    let b = s.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && matches!(b[*i], b' ' | b'\t') {
            *i += 1;
        }
    };
    'links: loop {
        if out.len() >= cap {
            return Line::Full;
        }
        // Whitespace and empty list elements.
        while i < b.len() && matches!(b[i], b' ' | b'\t' | b',') {
            i += 1;
        }
        if i >= b.len() || b[i] != b'<' {
            return Line::Ended;
        }
        let Some(end) = s[i + 1..].find('>') else {
            return Line::Ended;
        };
        let target = &s[i + 1..i + 1 + end];
        i += end + 2;
        let mut rels: Option<String> = None;
        let mut params: Vec<(String, String)> = Vec::new();
        loop {
            skip_ws(&mut i);
            if i >= b.len() || b[i] == b',' {
                i += 1;
                break;
            }
            if b[i] != b';' {
                return Line::Ended;
            }
            i += 1;
            skip_ws(&mut i);
            let start = i;
            while i < b.len() && !matches!(b[i], b'=' | b';' | b',' | b' ' | b'\t') {
                i += 1;
            }
            let name = &s[start..i];
            skip_ws(&mut i);
            let mut value = String::new();
            if i < b.len() && b[i] == b'=' {
                i += 1;
                skip_ws(&mut i);
                if i < b.len() && b[i] == b'"' {
                    i += 1;
                    while i < b.len() && b[i] != b'"' {
                        if b[i] == b'\\' && i + 1 < b.len() {
                            i += 1;
                        }
                        // Push whole characters, not bytes.
                        let ch = s[i..].chars().next().unwrap_or('\u{fffd}');
                        value.push(ch);
                        i += ch.len_utf8();
                    }
                    i += 1;
                } else {
                    let vs = i;
                    while i < b.len() && !matches!(b[i], b';' | b',') {
                        i += 1;
                    }
                    value = s[vs..i].trim_end_matches([' ', '\t']).to_owned();
                }
            }
            if name.is_empty() {
                continue;
            }
            let name = name.to_ascii_lowercase();
            if name == "rel" {
                rels.get_or_insert(value);
                continue;
            }
            let first_only = matches!(
                name.as_str(),
                "media" | "title" | "title*" | "type" | "anchor"
            );
            if first_only && params.iter().any(|(k, _)| *k == name) {
                continue;
            }
            if params.len() >= MAX_LINK_PARAMS {
                if name != "anchor" {
                    continue;
                }
                // An anchor changes whose link this is: it takes the last parameter's place.
                params.pop();
            }
            if name.ends_with('*') {
                if let Some(decoded) = decode_ext_value(&value) {
                    value = decoded;
                }
            }
            params.push((name, value));
        }
        let Some(rels) = rels else {
            continue;
        };
        let wanted = |r: &&str| !r.is_empty() && only.is_none_or(|o| r.eq_ignore_ascii_case(o));
        if !rels.split([' ', '\t']).any(|r| wanted(&r)) {
            continue;
        }
        // Resolved only for a link that is kept: each resolution copies the request URI, which a
        // peer chooses too (a page's URI is the previous page's next link).
        for (name, value) in &mut params {
            if name == "anchor" {
                if only.is_some() && *passed >= passed_over_budget(base) {
                    return Line::Full;
                }
                *value = resolve_reference(base, value);
                if only.is_some() && !same_resource(value, base) {
                    // Another resource's link.
                    *passed += base.len() + value.len();
                    continue 'links;
                }
            }
        }
        let value = Arc::new(LinkValue {
            target: resolve_reference(base, target),
            params,
        });
        for rel in rels.split([' ', '\t']).filter(wanted) {
            if out.len() >= cap {
                return Line::Full;
            }
            out.push(Link {
                value: Arc::clone(&value),
                rel: rel.to_ascii_lowercase(),
            });
        }
    }
}

/// RFC 8187 ext-value: `charset'lang'pct-encoded`. Only UTF-8 (and ASCII-compatible ISO-8859-1
/// bytes below 0x80) is decoded.
fn decode_ext_value(v: &str) -> Option<String> {
    let mut parts = v.splitn(3, '\'');
    let charset = parts.next()?;
    let _lang = parts.next()?;
    let enc = parts.next()?;
    if !charset.eq_ignore_ascii_case("utf-8") {
        return None;
    }
    let b = enc.as_bytes();
    let mut bytes = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if b[i] == b'%' {
            return None;
        } else {
            bytes.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn links(values: &[&str], base: &str) -> Vec<Link> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(http::header::LINK, v.parse().unwrap());
        }
        parse_link(&h, base)
    }

    #[test]
    fn next_link_reads_past_the_link_bound() {
        let mut many: Vec<String> = (0..MAX_LINKS * 3)
            .map(|n| format!("</items/{n}>; rel=\"item\""))
            .collect();
        many.push("</page/2>; rel=\"prev NEXT\"".into());
        let one_field = many.join(", ");
        let mut h = HeaderMap::new();
        h.append(http::header::LINK, one_field.parse().unwrap());
        assert_eq!(parse_link(&h, "http://h/a").len(), MAX_LINKS);
        assert_eq!(
            next_link(&h, "http://h/a").as_deref(),
            Some("http://h/page/2")
        );
        let mut h = HeaderMap::new();
        for l in &many {
            h.append(http::header::LINK, l.parse().unwrap());
        }
        assert_eq!(
            next_link(&h, "http://h/a").as_deref(),
            Some("http://h/page/2")
        );
    }

    #[test]
    fn ext_value() {
        assert_eq!(
            decode_ext_value("UTF-8'de'n%c3%a4chstes%20Kapitel").unwrap(),
            "n\u{e4}chstes Kapitel"
        );
        assert!(decode_ext_value("UTF-8'de'bad%2").is_none());
    }

    #[test]
    fn stops_at_garbage() {
        let l = links(&["<a>; rel=next, garbage, <b>; rel=last"], "http://h/");
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].target(), "http://h/a");
    }

    fn next(values: &[&str]) -> Option<String> {
        let mut h = HeaderMap::new();
        for v in values {
            h.append(http::header::LINK, v.parse().unwrap());
        }
        next_link(&h, "http://h/list?p=1")
    }

    #[test]
    fn a_malformed_link_ends_only_its_own_line() {
        for first in [
            "preload; </style.css>",
            ",",
            "garbage",
            "<unclosed; rel=next",
        ] {
            let l = links(&[first, "</b>; rel=\"last\""], "http://h/");
            assert_eq!(l.len(), 1, "{first}");
            assert_eq!(l[0].target(), "http://h/b");
            assert_eq!(
                next(&[first, "</list?p=2>; rel=\"next\""]).as_deref(),
                Some("http://h/list?p=2"),
                "{first}"
            );
        }
    }

    #[test]
    fn bytes_that_are_not_utf8_are_kept_percent_encoded() {
        let mut h = HeaderMap::new();
        h.append(
            http::header::LINK,
            http::HeaderValue::from_bytes(b"</list?p=2\xff>; rel=next").unwrap(),
        );
        assert_eq!(
            next_link(&h, "http://h/list?p=1").as_deref(),
            Some("http://h/list?p=2%FF")
        );
    }

    #[test]
    fn empty_list_elements_are_skipped() {
        let l = links(&[", <a>; rel=prev,, ,<b>; rel=next,"], "http://h/");
        assert_eq!(l.len(), 2);
        assert_eq!(
            next(&["<a>; rel=prev,,<b>; rel=next"]).as_deref(),
            Some("http://h/b")
        );
    }

    #[test]
    fn a_next_link_of_another_resource_is_passed_over() {
        assert_eq!(
            next(&["</p9>; rel=next; anchor=\"/other\", </list?p=2>; rel=next"]).as_deref(),
            Some("http://h/list?p=2")
        );
        // The page itself, or a fragment of it, is this page's context, however spelt.
        for anchor in [
            "",
            "#top",
            "/list?p=1",
            "http://h/list?p=1#x",
            "HTTP://H:80/list?p=%31",
            "http://u:p@h/%6cist?p=1",
        ] {
            let v = format!("</list?p=2>; rel=next; anchor=\"{anchor}\"");
            assert_eq!(
                next(&[&v]).as_deref(),
                Some("http://h/list?p=2"),
                "{anchor}"
            );
        }
        // Another port, path or query is another resource; an anchor after many parameters
        // still counts.
        for anchor in [
            "http://h:8080/list?p=1",
            "/list?p=2",
            "/List?p=1",
            "https://h/list?p=1",
        ] {
            let v = format!("</list?p=2>; rel=next; anchor=\"{anchor}\"");
            assert_eq!(next(&[&v]), None, "{anchor}");
        }
        let many: String = (0..MAX_LINK_PARAMS + 5)
            .map(|n| format!("; x{n}=y"))
            .collect();
        let v = format!("</p9>; rel=next{many}; anchor=\"/other\"");
        assert_eq!(next(&[&v]), None);
        let l = links(&[&v], "http://h/list");
        assert_eq!(l[0].params().len(), MAX_LINK_PARAMS);
        assert_eq!(l[0].param("anchor"), Some("http://h/other"));
        // Many other resources' next links against a long page URI: bounded, then no answer
        // (a short one reads on: 20,000 links cost less than 4 MiB of copies).
        let base = format!("http://h/{}", "p".repeat(60_000));
        let mut h = HeaderMap::new();
        for _ in 0..20_000 {
            h.append(
                http::header::LINK,
                "</x>; rel=next; anchor=\"/o\"".parse().unwrap(),
            );
        }
        h.append(http::header::LINK, "</y>; rel=next".parse().unwrap());
        // Without the bound, the `next` at the end would be found after 20,000 copies of it.
        assert_eq!(next_link(&h, &base), None);
        assert_eq!(
            next_link(&h, "http://h/list").as_deref(),
            Some("http://h/y")
        );
        let mut h = HeaderMap::new();
        for _ in 0..MAX_LINKS - 1 {
            h.append(
                http::header::LINK,
                "</x>; rel=next; anchor=\"/o\"".parse().unwrap(),
            );
        }
        h.append(http::header::LINK, "</y>; rel=next".parse().unwrap());
        assert_eq!(next_link(&h, &base).as_deref(), Some("http://h/y"));
        // parse_link keeps every link, with its anchor resolved.
        let l = links(&["</p9>; rel=next; anchor=\"/other\""], "http://h/list");
        assert_eq!(l[0].param("anchor"), Some("http://h/other"));
    }
}
