//! Who may deliver: an allowlist of source networks, with trusted proxies.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use http::{HeaderMap, HeaderName};
use sturdy_core::{Error, ErrorKind};

/// The most trusted-proxy entries skipped from the right of `X-Forwarded-For` / `Forwarded`: 32.
/// A header listing more trusted proxies before the source is refused.
pub const MAX_FORWARDED_HOPS: usize = 32;

/// An IPv4 or IPv6 network in CIDR notation (`192.30.252.0/22`, `2a0a:a440::/29`); a bare
/// address is a network of one.
///
/// An IPv4 network also matches the IPv4-mapped IPv6 form of its addresses
/// (`::ffff:192.30.252.1`), as a dual-stack socket reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

fn config(msg: String) -> Error {
    Error::new(ErrorKind::Config, msg)
}

impl Cidr {
    /// The network `addr/prefix`.
    ///
    /// # Errors
    /// When the prefix is longer than the address (32 for IPv4, 128 for IPv6), or `addr` has
    /// bits set past the prefix (`10.0.0.1/8`: write `10.0.0.0/8`).
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, Error> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if prefix > max {
            return Err(config(format!(
                "the network {addr}/{prefix} has a prefix longer than {max} bits"
            )));
        }
        let c = Self { addr, prefix };
        if c.network() != addr {
            return Err(config(format!(
                "the network {addr}/{prefix} has host bits set: did you mean {}/{prefix}?",
                c.network()
            )));
        }
        Ok(c)
    }

    /// The network's first address.
    fn network(&self) -> IpAddr {
        match self.addr {
            IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) & mask32(self.prefix))),
            IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) & mask128(self.prefix))),
        }
    }

    /// Whether `ip` is in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(n), IpAddr::V4(a)) => u32::from(a) & mask32(self.prefix) == u32::from(n),
            (IpAddr::V6(n), IpAddr::V6(a)) => u128::from(a) & mask128(self.prefix) == u128::from(n),
            _ => false,
        }
    }
}

fn mask32(prefix: u8) -> u32 {
    u32::MAX.checked_shl(32 - u32::from(prefix)).unwrap_or(0)
}

fn mask128(prefix: u8) -> u128 {
    u128::MAX.checked_shl(128 - u32::from(prefix)).unwrap_or(0)
}

impl FromStr for Cidr {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        let s = s.trim();
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| {
            config(format!(
                "{s:?} is not a network: expected an address or address/prefix, such as 192.0.2.0/24 or 2001:db8::/32"
            ))
        })?;
        let prefix = match prefix {
            None => {
                if addr.is_ipv4() {
                    32
                } else {
                    128
                }
            }
            Some(p) if !p.is_empty() && p.len() <= 3 && p.bytes().all(|b| b.is_ascii_digit()) => p
                .parse::<u8>()
                .map_err(|_| config(format!("the prefix of {s:?} is not a number of bits")))?,
            Some(_) => {
                return Err(config(format!(
                    "the prefix of {s:?} is not a number of bits"
                )))
            }
        };
        Self::new(addr, prefix)
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// The header a trusted proxy writes the client's address in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ForwardedHeader {
    /// `X-Forwarded-For: client, proxy1, proxy2`.
    #[default]
    XForwardedFor,
    /// `Forwarded: for=client, for=proxy1` (RFC 7239).
    Forwarded,
}

impl ForwardedHeader {
    fn name(self) -> HeaderName {
        match self {
            Self::XForwardedFor => HeaderName::from_static("x-forwarded-for"),
            Self::Forwarded => http::header::FORWARDED,
        }
    }
}

/// An allowlist of source networks for a receiver, for example the published ranges of a
/// provider's webhook senders (which you supply and keep up to date).
///
/// The source of a delivery is the peer address of its connection. When that peer is a
/// configured trusted proxy, the source is read from the proxy's header instead
/// ([`ForwardedHeader`], `X-Forwarded-For` by default): walking its addresses from the right
/// (the most recent hop), trusted proxies are skipped and the first other address is the
/// source. `Forwarded` is split as RFC 7239 writes it, quoted strings kept whole (a comma
/// inside `host="..."` starts no element). An address in the header that is not an IP address
/// (`unknown`, an obfuscated `Forwarded` node), a malformed `Forwarded` line (an open quoted
/// string, an element with no `for=` or two), or more than [`MAX_FORWARDED_HOPS`] trusted hops,
/// makes the source unknown, and the delivery is refused. The header of a peer that is not a trusted proxy is
/// never read, so it cannot be forged.
///
/// # Example
///
/// ```
/// use std::net::IpAddr;
/// use http::HeaderMap;
/// use sturdy_webhook::SourceAllowlist;
///
/// let list = SourceAllowlist::new(["192.30.252.0/22", "2a0a:a440::/29"])?
///     .with_trusted_proxies(["10.0.0.0/8"])?;
/// let mut headers = HeaderMap::new();
/// headers.insert("x-forwarded-for", "192.30.252.7, 10.1.2.3".parse()?);
/// // Through two of our proxies: the source is the sender.
/// assert!(list.allows("10.0.0.1".parse::<IpAddr>()?, &headers));
/// // Straight from the internet: the header is ignored, the peer is the source.
/// assert!(!list.allows("203.0.113.9".parse::<IpAddr>()?, &headers));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct SourceAllowlist {
    allowed: Vec<Cidr>,
    proxies: Vec<Cidr>,
    header: ForwardedHeader,
}

fn parse_all<I, S>(cidrs: I) -> Result<Vec<Cidr>, Error>
where
    I: IntoIterator<Item = S>,
    S: AsRef<str>,
{
    cidrs.into_iter().map(|c| c.as_ref().parse()).collect()
}

impl SourceAllowlist {
    /// Deliveries are accepted from these networks only.
    ///
    /// # Errors
    /// When a network is not valid CIDR notation, or none is given (the receiver would refuse
    /// everything).
    pub fn new<I, S>(networks: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let allowed = parse_all(networks)?;
        if allowed.is_empty() {
            return Err(config(
                "the source allowlist is empty: it would refuse every delivery".to_owned(),
            ));
        }
        Ok(Self {
            allowed,
            proxies: Vec::new(),
            header: ForwardedHeader::default(),
        })
    }

    /// Peers in these networks are your own proxies: their forwarding header is read to find
    /// the source \[none: the header is never read\]. Name only proxies that overwrite or
    /// append to that header; a client's own copy of it is otherwise taken at its word.
    ///
    /// # Errors
    /// When a network is not valid CIDR notation.
    pub fn with_trusted_proxies<I, S>(mut self, networks: I) -> Result<Self, Error>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.proxies = parse_all(networks)?;
        Ok(self)
    }

    /// The header the trusted proxies write \[`X-Forwarded-For`\].
    #[must_use]
    pub fn with_forwarded_header(mut self, header: ForwardedHeader) -> Self {
        self.header = header;
        self
    }

    fn trusted(&self, ip: IpAddr) -> bool {
        self.proxies.iter().any(|c| c.contains(ip))
    }

    /// The source of a request from `peer` with `headers`, or `None` when it cannot be told.
    pub fn source(&self, peer: IpAddr, headers: &HeaderMap) -> Option<IpAddr> {
        let peer = peer.to_canonical();
        if !self.trusted(peer) {
            return Some(peer);
        }
        let values: Vec<&str> = headers
            .get_all(self.header.name())
            .iter()
            .map(|v| v.to_str().ok())
            .collect::<Option<_>>()?;
        match self.header {
            ForwardedHeader::XForwardedFor => self.walk(
                peer,
                values
                    .iter()
                    .rev()
                    .flat_map(|v| v.rsplit(','))
                    .map(str::trim),
                parse_node,
            ),
            ForwardedHeader::Forwarded => {
                // Split each line whole first: a quoted string (a proxy may quote a client's
                // own `Host` into `host="..."`) can hold commas and semicolons, so the
                // elements cannot be found by scanning back from the right.
                let lines: Vec<Vec<&str>> = values
                    .iter()
                    .map(|v| split_unquoted(v, b','))
                    .collect::<Option<_>>()?;
                self.walk(
                    peer,
                    lines.iter().rev().flat_map(|l| l.iter().rev().copied()),
                    forwarded_for,
                )
            }
        }
    }

    /// Walks the header's entries from the right (the most recent hop): trusted proxies are
    /// skipped, and the first other address is the source.
    fn walk<'a>(
        &self,
        peer: IpAddr,
        entries: impl Iterator<Item = &'a str>,
        node: fn(&str) -> Option<IpAddr>,
    ) -> Option<IpAddr> {
        let mut source = peer;
        let mut hops = 0;
        for entry in entries {
            if entry.trim().is_empty() {
                continue;
            }
            let ip = node(entry)?.to_canonical();
            if !self.trusted(ip) {
                return Some(ip);
            }
            hops += 1;
            if hops > MAX_FORWARDED_HOPS {
                return None;
            }
            source = ip;
        }
        // Every hop was one of our proxies: the request started at the left-most of them.
        Some(source)
    }

    /// Whether a request from `peer` with `headers` comes from an allowed network.
    pub fn allows(&self, peer: IpAddr, headers: &HeaderMap) -> bool {
        self.source(peer, headers)
            .is_some_and(|ip| self.allowed.iter().any(|c| c.contains(ip)))
    }
}

/// An address as a proxy writes it: `192.0.2.1`, `192.0.2.1:80`, `2001:db8::1`,
/// `[2001:db8::1]`, `[2001:db8::1]:80`.
fn parse_node(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    let inner = s.strip_prefix('[')?.strip_suffix(']')?;
    inner.parse::<Ipv6Addr>().ok().map(IpAddr::V6)
}

/// `s` split at each `sep` outside a quoted string (RFC 9110 §5.6.4: a backslash inside quotes
/// escapes the next character). `None` when a quoted string is left open: the field is
/// malformed, and a value cut at a guess could name a source the proxy never wrote.
fn split_unquoted(s: &str, sep: u8) -> Option<Vec<&str>> {
    let bytes = s.as_bytes();
    let mut parts = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b if b == sep && !quoted => {
                // `sep` is ASCII, so this is a character boundary.
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
        i += 1;
    }
    if quoted {
        return None;
    }
    parts.push(&s[start..]);
    Some(parts)
}

/// The `for=` node of one `Forwarded` element (RFC 7239 §4, §6), its parameters split outside
/// quoted strings: `unknown` and obfuscated nodes, an element without `for=` or with two, and
/// a value that is neither a token nor one whole quoted string give `None`.
fn forwarded_for(element: &str) -> Option<IpAddr> {
    let mut node = None;
    for pair in split_unquoted(element, b';')? {
        let Some((k, v)) = pair.split_once('=') else {
            if pair.trim().is_empty() {
                continue;
            }
            return None;
        };
        if !k.trim().eq_ignore_ascii_case("for") {
            continue;
        }
        if node.is_some() {
            // RFC 7239 §4: a parameter occurs at most once per element.
            return None;
        }
        node = Some(v.trim());
    }
    let v = node?;
    match v.strip_prefix('"') {
        // A quoted node: one quoted string, its escapes undone (an address needs none).
        Some(rest) => {
            let inner = rest.strip_suffix('"')?;
            if inner.contains('"') {
                return None;
            }
            if inner.contains('\\') {
                let mut unescaped = String::with_capacity(inner.len());
                let mut chars = inner.chars();
                while let Some(c) = chars.next() {
                    unescaped.push(if c == '\\' { chars.next()? } else { c });
                }
                return parse_node(&unescaped);
            }
            parse_node(inner)
        }
        None => parse_node(v),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_parse_and_match() {
        let c: Cidr = "192.30.252.0/22".parse().unwrap();
        assert!(c.contains(ip("192.30.255.255")));
        assert!(c.contains(ip("::ffff:192.30.252.1")), "IPv4-mapped");
        assert!(!c.contains(ip("192.30.251.255")));
        assert!(!c.contains(ip("2a0a:a440::1")));
        let c6: Cidr = "2a0a:a440::/29".parse().unwrap();
        assert!(c6.contains(ip("2a0a:a447:ffff::1")));
        assert!(!c6.contains(ip("2a0a:a448::1")));
        assert!(!c6.contains(ip("192.30.252.1")));
        let all: Cidr = "0.0.0.0/0".parse().unwrap();
        assert!(all.contains(ip("255.255.255.255")));
        let one: Cidr = "203.0.113.9".parse().unwrap();
        assert!(one.contains(ip("203.0.113.9")) && !one.contains(ip("203.0.113.8")));
        assert_eq!(one.to_string(), "203.0.113.9/32");
        let all6: Cidr = "::/0".parse().unwrap();
        assert!(all6.contains(ip("::1")));
        for bad in [
            "",
            "10.0.0.0/33",
            "::/129",
            "10.0.0.1/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/08x",
            "10.0.0/8",
            "example.com/8",
            "10.0.0.0/8/8",
        ] {
            let e = bad.parse::<Cidr>().unwrap_err();
            assert_eq!(e.kind(), &ErrorKind::Config, "{bad}");
        }
        assert!("10.0.0.1/8"
            .parse::<Cidr>()
            .unwrap_err()
            .to_string()
            .contains("did you mean 10.0.0.0/8"));
    }

    fn xff(v: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in v {
            h.append("x-forwarded-for", v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_right_most_untrusted_address_is_the_source() {
        let l = SourceAllowlist::new(["192.0.2.0/24"])
            .unwrap()
            .with_trusted_proxies(["10.0.0.0/8", "fd00::/8"])
            .unwrap();
        let proxy = ip("10.0.0.1");
        assert_eq!(
            l.source(proxy, &xff(&["192.0.2.1, 10.9.9.9"])),
            Some(ip("192.0.2.1"))
        );
        // A forged left-most entry is not the source: the right-most untrusted one is.
        assert_eq!(
            l.source(proxy, &xff(&["192.0.2.1, 203.0.113.5"])),
            Some(ip("203.0.113.5"))
        );
        // Several header lines are one list, in order.
        assert_eq!(
            l.source(proxy, &xff(&["203.0.113.5", "192.0.2.7:4711, fd00::1"])),
            Some(ip("192.0.2.7"))
        );
        assert_eq!(
            l.source(proxy, &xff(&["[2001:db8::1]:80"])),
            Some(ip("2001:db8::1"))
        );
        // No header from a proxy: the proxy is the source (not allowed here).
        assert_eq!(l.source(proxy, &HeaderMap::new()), Some(proxy));
        assert!(!l.allows(proxy, &HeaderMap::new()));
        // Garbage, or too many hops: unknown, refused.
        assert_eq!(l.source(proxy, &xff(&["unknown"])), None);
        assert_eq!(l.source(proxy, &xff(&["192.0.2.1, garbage"])), None);
        let mut hops = vec!["10.0.0.2"; MAX_FORWARDED_HOPS];
        assert_eq!(
            l.source(proxy, &xff(&[&hops.join(",")])),
            Some(ip("10.0.0.2"))
        );
        hops.insert(0, "192.0.2.1");
        assert_eq!(
            l.source(proxy, &xff(&[&hops.join(",")])),
            Some(ip("192.0.2.1"))
        );
        hops.push("10.0.0.3");
        assert_eq!(l.source(proxy, &xff(&[&hops.join(",")])), None);
        // An untrusted peer's header is never read.
        assert_eq!(
            l.source(ip("203.0.113.5"), &xff(&["192.0.2.1"])),
            Some(ip("203.0.113.5"))
        );
        // A dual-stack socket's IPv4-mapped peer is matched as IPv4.
        assert_eq!(
            l.source(ip("::ffff:10.0.0.1"), &xff(&["192.0.2.1"])),
            Some(ip("192.0.2.1"))
        );
    }

    #[test]
    fn forwarded_header() {
        let l = SourceAllowlist::new(["2001:db8:cafe::/48"])
            .unwrap()
            .with_trusted_proxies(["10.0.0.0/8"])
            .unwrap()
            .with_forwarded_header(ForwardedHeader::Forwarded);
        let mut h = HeaderMap::new();
        h.insert(
            "forwarded",
            "for=192.0.2.43, for=\"[2001:db8:cafe::17]:4711\";proto=https, For=10.1.1.1"
                .parse()
                .unwrap(),
        );
        // X-Forwarded-For is not read when Forwarded is configured.
        h.insert("x-forwarded-for", "203.0.113.1".parse().unwrap());
        assert_eq!(l.source(ip("10.0.0.1"), &h), Some(ip("2001:db8:cafe::17")));
        assert!(l.allows(ip("10.0.0.1"), &h));
        h.insert("forwarded", "for=unknown".parse().unwrap());
        assert_eq!(l.source(ip("10.0.0.1"), &h), None);
        h.insert("forwarded", "for=_hidden;by=10.0.0.1".parse().unwrap());
        assert_eq!(l.source(ip("10.0.0.1"), &h), None);
        h.insert("forwarded", "proto=https".parse().unwrap());
        assert_eq!(l.source(ip("10.0.0.1"), &h), None);
    }

    #[test]
    fn forwarded_quoted_strings_keep_their_commas_and_semicolons() {
        let l = SourceAllowlist::new(["192.30.252.0/22"])
            .unwrap()
            .with_trusted_proxies(["10.0.0.0/8"])
            .unwrap()
            .with_forwarded_header(ForwardedHeader::Forwarded);
        let peer = ip("10.0.0.1");
        let source = |value: &str| {
            let mut h = HeaderMap::new();
            h.insert("forwarded", value.parse().unwrap());
            l.source(peer, &h)
        };
        // A client's Host quoted by a proxy cannot add an element or a `for=` of its own.
        assert_eq!(
            source(r#"for=203.0.113.9;host="x,for=192.30.252.7;y=""#),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(
            source(r#"for=203.0.113.9;by="x,for=192.30.252.7""#),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(
            source(r#"for=192.30.252.7;host="a,b;c", for=10.2.2.2;host="d""#),
            Some(ip("192.30.252.7"))
        );
        // An escaped quote does not end a quoted string.
        assert_eq!(
            source(r#"for=203.0.113.9;host="x\",for=192.30.252.7""#),
            Some(ip("203.0.113.9"))
        );
        assert_eq!(
            source(r#"for="[2001:db8\:cafe::17]:4711""#),
            Some(ip("2001:db8:cafe::17"))
        );
        // Malformed: an open quote, a parameter twice, a node that is not one quoted string.
        assert_eq!(source(r#"for=203.0.113.9;host="x, for=192.30.252.7"#), None);
        assert_eq!(source("for=192.30.252.7;for=203.0.113.9"), None);
        assert_eq!(source(r#"for="192.30.252.7"x"#), None);
        assert_eq!(source("for=192.30.252.7;junk"), None);
        // Empty elements and parameters are skipped, as before.
        assert_eq!(
            source("for=192.30.252.7;, ,for=10.1.1.1"),
            Some(ip("192.30.252.7"))
        );
        // Each line is split on its own: an open quote on one line is not closed by the next.
        let mut h = HeaderMap::new();
        h.append("forwarded", r#"for=203.0.113.9;host="x"#.parse().unwrap());
        h.append("forwarded", r#"for=192.30.252.7""#.parse().unwrap());
        assert_eq!(l.source(peer, &h), None);
    }

    #[test]
    fn configuration_errors_are_reported_when_built() {
        assert!(SourceAllowlist::new(Vec::<String>::new()).is_err());
        assert!(SourceAllowlist::new(["nope"]).is_err());
        assert!(SourceAllowlist::new(["10.0.0.0/8"])
            .unwrap()
            .with_trusted_proxies(["10.0.0.0/99"])
            .is_err());
    }
}
