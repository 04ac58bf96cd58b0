//! The opaque cursor of [`Paginate::page`](crate::Paginate::page): where to resume, signed so
//! that only cursors this pager returned are accepted.
//!
//! Format: `base64url(tag || json)`, where `json` is the [`Resume`] and `tag` the first 16 bytes
//! of HMAC-SHA-256 over a version label, the pager's URI and `json`. Binding the pager's URI
//! means a cursor of one endpoint is refused by a pager of another, even with a shared
//! key.

use base64::Engine as _;
use hmac::{Hmac, Mac};
use http::Uri;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sturdy_core::Error;

use crate::err;

/// The longest cursor [`Paginate::page`](crate::Paginate::page) returns or accepts, in
/// characters \[16 KiB\].
pub const MAX_CURSOR_LEN: usize = 16 * 1024;

/// Bytes of the HMAC-SHA-256 tag kept in a cursor (128 bits).
const TAG_LEN: usize = 16;

/// What the MAC covers before the payload; a new format gets a new label.
const LABEL: &[u8] = b"sturdy-paginate cursor v1\0";

/// How long a user-supplied cursor key must be, in bytes.
pub(crate) const MIN_KEY_LEN: usize = 32;

pub(crate) type CursorMac = Hmac<Sha256>;

/// The identity of a page: a digest of the URI it is fetched from (scheme and host compared
/// without case, the scheme's default port the same as none: `https://a.example/x`,
/// `HTTPS://A.example:443/x` and `https://a.example:/x` are one page). Two cursors that lead to
/// the same URI lead to the same page.
pub(crate) type PageId = [u8; 16];

pub(crate) fn page_id(uri: &Uri) -> PageId {
    let mut h = Sha256::new();
    // The origin as the same-origin check reads it (scheme and host without case, the scheme's
    // default port when none is written); the userinfo beside it, since other credentials may
    // see other pages. A port that is not a port number has no origin: the authority as written.
    let authority = uri.authority().map_or("", |a| a.as_str());
    match crate::origin(uri) {
        Some((scheme, host, port)) => {
            h.update(&scheme);
            h.update(b"://");
            if let Some((userinfo, _)) = authority.rsplit_once('@') {
                h.update(userinfo);
                h.update(b"@");
            }
            h.update(&host);
            if let Some(p) = port {
                h.update(b":");
                h.update(p.to_be_bytes());
            }
        }
        None => {
            h.update(b"?");
            h.update(authority.to_ascii_lowercase());
        }
    }
    h.update(uri.path_and_query().map_or("/", |p| p.as_str()));
    let d = h.finalize();
    let mut id = [0; 16];
    id.copy_from_slice(&d[..16]);
    id
}

/// Where a bounded page resumes.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Resume {
    /// The strategy's cursor of the page to read from (`None`: the first page).
    pub(crate) c: Option<String>,
    /// Items of that page already returned.
    pub(crate) s: usize,
    /// The page size the walk uses, so positions stay stable.
    pub(crate) l: usize,
    /// The page whose next cursor `c` is (hex of its [`PageId`]), when `s` is 0: a cursor that
    /// leads back to it is a loop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) f: Option<String>,
}

impl Resume {
    pub(crate) fn linked_from(&self) -> Option<PageId> {
        let f = self.f.as_deref()?;
        let mut id = [0; 16];
        if f.len() != 32 {
            return None;
        }
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(f.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(id)
    }

    pub(crate) fn set_linked_from(&mut self, id: &PageId) {
        self.f = Some(id.iter().map(|b| format!("{b:02x}")).collect());
    }
}

fn mac(key: &CursorMac, base: &Uri, payload: &[u8]) -> CursorMac {
    let mut m = key.clone();
    m.update(LABEL);
    m.update(base.to_string().as_bytes());
    m.update(b"\0");
    m.update(payload);
    m
}

/// Signs and encodes a resume point.
///
/// # Errors
/// When the cursor would be longer than [`MAX_CURSOR_LEN`] (the server's own cursor is huge).
pub(crate) fn encode(key: &CursorMac, base: &Uri, resume: &Resume) -> Result<String, Error> {
    let payload = serde_json::to_vec(resume).unwrap_or_default();
    let tag = mac(key, base, &payload).finalize().into_bytes();
    let mut raw = Vec::with_capacity(TAG_LEN + payload.len());
    raw.extend_from_slice(&tag[..TAG_LEN]);
    raw.extend_from_slice(&payload);
    let s = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    if s.len() > MAX_CURSOR_LEN {
        return Err(err(format!(
            "the server's next cursor is too long to hand out ({} characters once encoded, more than {MAX_CURSOR_LEN})",
            s.len()
        )));
    }
    Ok(s)
}

/// Checks and decodes a cursor; nothing is trusted before the tag is verified.
///
/// # Errors
/// When the cursor was not made by [`encode`] with this key and base (forged, edited, truncated,
/// from another pager), or is longer than [`MAX_CURSOR_LEN`].
pub(crate) fn decode(key: &CursorMac, base: &Uri, cursor: &str) -> Result<Resume, Error> {
    let refused = || {
        let shown: String = cursor.chars().take(24).collect();
        let ellipsis = if cursor.chars().count() > 24 {
            "..."
        } else {
            ""
        };
        // Refused before any page is requested: nothing was sent.
        err(format!(
            "{shown:?}{ellipsis} is not a cursor this pager returned (unknown, edited, or from another pager or endpoint); start again without a cursor"
        ))
        .with_delivery(sturdy_core::Delivery::NotSent)
    };
    if cursor.len() > MAX_CURSOR_LEN {
        return Err(refused());
    }
    let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(cursor)
        .map_err(|_| refused())?;
    if raw.len() < TAG_LEN {
        return Err(refused());
    }
    let (tag, payload) = raw.split_at(TAG_LEN);
    mac(key, base, payload)
        .verify_truncated_left(tag)
        .map_err(|_| refused())?;
    let resume: Resume = serde_json::from_slice(payload).map_err(|_| refused())?;
    if resume.l == 0 {
        return Err(refused());
    }
    Ok(resume)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> CursorMac {
        CursorMac::new_from_slice(&[b; 32]).unwrap()
    }

    #[test]
    fn round_trip_and_tamper() {
        let base: Uri = "https://api.example.com/items".parse().unwrap();
        let mut r = Resume {
            c: Some("abc".into()),
            s: 3,
            l: 20,
            f: None,
        };
        r.set_linked_from(&page_id(&base));
        let c = encode(&key(1), &base, &r).unwrap();
        assert_eq!(decode(&key(1), &base, &c).unwrap(), r);
        assert_eq!(r.linked_from(), Some(page_id(&base)));
        // Another key, another endpoint, one character changed, truncated: refused.
        assert!(decode(&key(2), &base, &c).is_err());
        let other: Uri = "https://api.example.com/users".parse().unwrap();
        assert!(decode(&key(1), &other, &c).is_err());
        let mut edited = c.clone().into_bytes();
        let last = edited.len() - 1;
        edited[last] = if edited[last] == b'A' { b'B' } else { b'A' };
        assert!(decode(&key(1), &base, &String::from_utf8(edited).unwrap()).is_err());
        assert!(decode(&key(1), &base, &c[..c.len() - 2]).is_err());
        assert!(decode(&key(1), &base, "").is_err());
        assert!(decode(&key(1), &base, &"A".repeat(MAX_CURSOR_LEN + 1)).is_err());
    }

    #[test]
    fn page_ids_ignore_host_case_only() {
        let a: Uri = "https://API.example.com/x?p=1".parse().unwrap();
        let b: Uri = "https://api.example.com/x?p=1".parse().unwrap();
        let c: Uri = "https://api.example.com/x?p=2".parse().unwrap();
        assert_eq!(page_id(&a), page_id(&b));
        assert_ne!(page_id(&a), page_id(&c));
    }

    #[test]
    fn page_ids_take_the_default_port_as_none() {
        let id = |u: &str| page_id(&u.parse().unwrap());
        let first = id("https://api.example.com/x?p=1");
        for same in [
            "https://api.example.com:443/x?p=1",
            "HTTPS://API.example.com:0443/x?p=1",
            "https://api.example.com:/x?p=1",
        ] {
            assert_eq!(id(same), first, "{same}");
        }
        for other in [
            "https://api.example.com:8443/x?p=1",
            "https://api.example.com:80/x?p=1",
            "http://api.example.com:443/x?p=1",
        ] {
            assert_ne!(id(other), first, "{other}");
        }
        assert_eq!(id("http://[::1]:80/x"), id("http://[::1]/x"));
        assert_ne!(id("http://[::1]:81/x"), id("http://[::1]/x"));
        assert_eq!(id("http://u:80@h:80/x"), id("http://u:80@h/x"));
        assert_ne!(id("http://u:80@h/x"), id("http://u@h/x"));
    }
}
