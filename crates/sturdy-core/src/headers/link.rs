use http::HeaderMap;

use super::uri::resolve_reference;

/// One link of an RFC 8288 `Link` header: a target, one relation type, and the other parameters.
///
/// A `rel` with several space-separated types gives one `Link` per type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The target, resolved against the request URI.
    pub target: String,
    /// The relation type, lowercased (`next`, `prev`, or an extension URI).
    pub rel: String,
    /// The other parameters in order, names lowercased; a parameter without `=` has an empty
    /// value; `title*`-style values are decoded (RFC 8187).
    pub params: Vec<(String, String)>,
}

impl Link {
    /// A parameter by (lowercase) name.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The title, preferring `title*` over `title` as RFC 8288 asks.
    pub fn title(&self) -> Option<&str> {
        self.param("title*").or_else(|| self.param("title"))
    }
}

/// Parses every `Link` field line (RFC 8288 §3, following the Appendix B algorithm): parsing stops
/// at the first malformed link and returns the links before it. Relative targets are resolved
/// against `request_uri`; a link without `rel` is dropped; a repeated `rel`, `media`, `title`,
/// `title*` or `type` keeps its first value.
pub fn parse_link(headers: &HeaderMap, request_uri: &str) -> Vec<Link> {
    let mut out = Vec::new();
    for value in headers.get_all(http::header::LINK) {
        if !parse_value(value.as_bytes(), request_uri, &mut out) {
            break;
        }
    }
    out
}

/// The target of the first `rel="next"` link, resolved against `request_uri`.
pub fn next_link(headers: &HeaderMap, request_uri: &str) -> Option<String> {
    parse_link(headers, request_uri)
        .into_iter()
        .find(|l| l.rel == "next")
        .map(|l| l.target)
}

/// Returns false if parsing stopped early.
fn parse_value(bytes: &[u8], base: &str, out: &mut Vec<Link>) -> bool {
    let s = String::from_utf8_lossy(bytes);
    let b = s.as_bytes();
    let mut i = 0;
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && matches!(b[*i], b' ' | b'\t') {
            *i += 1;
        }
    };
    loop {
        skip_ws(&mut i);
        if i >= b.len() {
            return true;
        }
        if b[i] != b'<' {
            return false;
        }
        let Some(end) = s[i + 1..].find('>') else {
            return false;
        };
        let target = &s[i + 1..i + 1 + end];
        i += end + 2;
        let mut params: Vec<(String, String)> = Vec::new();
        loop {
            skip_ws(&mut i);
            if i >= b.len() || b[i] == b',' {
                i += 1;
                break;
            }
            if b[i] != b';' {
                return false;
            }
            i += 1;
            skip_ws(&mut i);
            let start = i;
            while i < b.len() && !matches!(b[i], b'=' | b';' | b',' | b' ' | b'\t') {
                i += 1;
            }
            let name = s[start..i].to_ascii_lowercase();
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
            if name.ends_with('*') {
                if let Some(decoded) = decode_ext_value(&value) {
                    value = decoded;
                }
            }
            let first_only = matches!(
                name.as_str(),
                "rel" | "media" | "title" | "title*" | "type" | "anchor"
            );
            if name.is_empty() || (first_only && params.iter().any(|(k, _)| *k == name)) {
                continue;
            }
            params.push((name, value));
        }
        let Some(rel_pos) = params.iter().position(|(k, _)| k == "rel") else {
            continue;
        };
        let (_, rels) = params.remove(rel_pos);
        let target = resolve_reference(base, target);
        if let Some(anchor) = params.iter_mut().find(|(k, _)| k == "anchor") {
            anchor.1 = resolve_reference(base, &anchor.1);
        }
        for rel in rels.split([' ', '\t']).filter(|r| !r.is_empty()) {
            out.push(Link {
                target: target.clone(),
                rel: rel.to_ascii_lowercase(),
                params: params.clone(),
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
        assert_eq!(l[0].target, "http://h/a");
    }
}
