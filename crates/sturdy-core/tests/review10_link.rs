//! Review of `Link` anchors resolved only for kept links: a `rel` after its `anchor`, repeated
//! anchors (the first kept), `anchor*`, several relation types, `next_link` against
//! `parse_link`, over many generated headers.

use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use sturdy_core::headers::{next_link, parse_link, resolve_reference, Link, MAX_LINKS};

fn lines(values: &[String]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for v in values {
        h.append(http::header::LINK, HeaderValue::from_str(v).unwrap());
    }
    h
}

const BASE: &str = "https://api.example.com/v1/items?page=3";

#[test]
fn rel_after_anchor_and_repeated_anchors() {
    let base = BASE;
    for v in [
        r##"</p2>; anchor="#a"; rel="next", </p3>; rel="last"; anchor="../x""##,
        r##"</p2>; anchor="#a"; anchor="#b"; rel="next", </p3>; anchor="../x"; rel=last; anchor=y"##,
        r##"</p2>; ANCHOR="#a"; Rel="NEXT"; anchor="#b", </p3>; anchor=../x; rel=last"##,
    ] {
        let l = parse_link(&lines(&[v.to_owned()]), base);
        assert_eq!(l.len(), 2, "{v}");
        assert_eq!(l[0].rel(), "next");
        assert_eq!(l[0].target(), "https://api.example.com/p2");
        assert_eq!(
            l[0].param("anchor"),
            Some("https://api.example.com/v1/items?page=3#a"),
            "{v}"
        );
        assert_eq!(
            l[0].params().iter().filter(|(k, _)| k == "anchor").count(),
            1
        );
        assert_eq!(
            l[1].param("anchor"),
            Some("https://api.example.com/x"),
            "{v}"
        );
        assert_eq!(
            next_link(&lines(&[v.to_owned()]), base).as_deref(),
            Some("https://api.example.com/p2")
        );
    }
}

/// `anchor*` is an RFC 8187 value: decoded, not resolved (as before this change), and a separate
/// parameter from `anchor`.
#[test]
fn anchor_star_is_decoded_and_kept_apart() {
    let v = r##"</p2>; anchor*=UTF-8''%2Fdoc; anchor="/c"; rel="next""##.to_owned();
    let l = parse_link(&lines(&[v]), BASE);
    assert_eq!(l[0].param("anchor*"), Some("/doc"));
    assert_eq!(l[0].param("anchor"), Some("https://api.example.com/c"));
}

/// A link with several relation types resolves its anchor once, shared by every type.
#[test]
fn several_rels_share_one_resolved_anchor() {
    let v = r##"</p2>; anchor="#frag"; rel="prev next LAST http://e.x/rel""##.to_owned();
    let l = parse_link(&lines(std::slice::from_ref(&v)), BASE);
    let rels: Vec<&str> = l.iter().map(Link::rel).collect();
    assert_eq!(rels, ["prev", "next", "last", "http://e.x/rel"]);
    for k in &l {
        assert_eq!(
            k.param("anchor"),
            Some("https://api.example.com/v1/items?page=3#frag")
        );
    }
    assert_eq!(
        next_link(&lines(&[v]), BASE).as_deref(),
        Some("https://api.example.com/p2")
    );
}

/// One generated link-value and what it should give.
#[derive(Debug, Clone)]
struct Gen {
    target: String,
    rel: Option<String>,
    anchors: Vec<String>,
    /// Position of `rel` among the parameters (before, between or after the anchors).
    rel_at: usize,
    extra: Vec<(String, String)>,
    quote: bool,
}

impl Gen {
    fn text(&self) -> String {
        let q = |v: &str| {
            if self.quote {
                format!("\"{v}\"")
            } else {
                v.to_owned()
            }
        };
        let mut params: Vec<String> = self
            .anchors
            .iter()
            .map(|a| format!("anchor={}", q(a)))
            .collect();
        for (k, v) in &self.extra {
            params.push(format!("{k}={}", q(v)));
        }
        if let Some(r) = &self.rel {
            let at = self.rel_at.min(params.len());
            params.insert(at, format!("rel=\"{r}\""));
        }
        let mut s = format!("<{}>", self.target);
        for p in params {
            s.push_str("; ");
            s.push_str(&p);
        }
        s
    }
}

fn gen_link() -> impl Strategy<Value = Gen> {
    let target = prop::sample::select(vec![
        "/p2",
        "p3?x=1",
        "../up",
        "//other.example/p",
        "https://h.example/abs?c=%41",
        "#f",
        "",
        "?page=4",
    ]);
    let rel = prop::option::weighted(
        0.9,
        prop::sample::select(vec![
            "next",
            "prev",
            "NEXT",
            "prev next",
            "last  first",
            "item",
            "http://e.x/r next",
        ]),
    );
    let anchor = prop::sample::select(vec!["#a", "/c", "../d?e=f", "https://x.example/", "", "g"]);
    let extra = prop::collection::vec(
        (
            prop::sample::select(vec!["title", "type", "media", "x-custom", "hreflang"]),
            prop::sample::select(vec!["t1", "text/html", "a b"]),
        ),
        0..4,
    );
    (
        target,
        rel,
        prop::collection::vec(anchor, 0..3),
        0usize..6,
        extra,
        any::<bool>(),
    )
        .prop_map(|(t, r, a, at, extra, quote)| Gen {
            target: t.to_owned(),
            rel: r.map(str::to_owned),
            anchors: a.into_iter().map(str::to_owned).collect(),
            rel_at: at,
            extra: extra
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
            quote,
        })
}

fn expected(links: &[Gen], base: &str) -> Vec<(String, String, Option<String>)> {
    let mut out = Vec::new();
    for g in links {
        let Some(rel) = &g.rel else { continue };
        for r in rel.split(' ').filter(|r| !r.is_empty()) {
            if out.len() == MAX_LINKS {
                return out;
            }
            out.push((
                resolve_reference(base, &g.target),
                r.to_ascii_lowercase(),
                g.anchors.first().map(|a| resolve_reference(base, a)),
            ));
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    /// Targets, relation types and first anchors as the RFC says, wherever `rel` stands; one
    /// field line or one line per link gives the same; `next_link` is the first `next` of
    /// `parse_link`.
    #[test]
    fn generated_headers_keep_their_meaning(
        links in prop::collection::vec(gen_link(), 0..12),
        base in prop::sample::select(vec![BASE, "http://h/a/b/c", "https://u:p@h:8443/x/?q#f"]),
    ) {
        let one = lines(&[links.iter().map(Gen::text).collect::<Vec<_>>().join(", ")]);
        let many = lines(&links.iter().map(Gen::text).collect::<Vec<_>>());
        let a = parse_link(&one, base);
        let b = if links.is_empty() { Vec::new() } else { parse_link(&many, base) };
        prop_assert_eq!(&a, &b);
        let got: Vec<(String, String, Option<String>)> = a
            .iter()
            .map(|l| (l.target().to_owned(), l.rel().to_owned(), l.param("anchor").map(str::to_owned)))
            .collect();
        prop_assert_eq!(got, expected(&links, base));
        // The first `next` whose context is this page: no anchor, or one that names this
        // resource (a fragment of it included); another resource's `next` is passed over.
        let page = |u: &str| u.split('#').next().unwrap_or_default().to_owned();
        let first_next = a
            .iter()
            .find(|l| l.rel() == "next" && l.param("anchor").is_none_or(|c| page(c) == page(base)))
            .map(|l| l.target().to_owned());
        prop_assert_eq!(&next_link(&one, base), &first_next);
        if !links.is_empty() {
            prop_assert_eq!(next_link(&many, base), first_next);
        }
        for l in &a {
            prop_assert!(l.params().iter().filter(|(k, _)| k == "anchor").count() <= 1);
            prop_assert!(l.params().iter().all(|(k, _)| k != "rel"));
        }
    }
}
