//! `pg_emit.allowed_destinations`: where the database may connect to.
//!
//! An extension that opens connections from the database host is an SSRF
//! tool unless destinations are restricted. The list is checked against the
//! addresses a name *resolves to*, right before connecting, and the
//! connection goes to an address that passed: a name that resolves to a
//! refused address is refused, and there is no window in which DNS can
//! change its answer between check and connect.
//!
//! Entries, comma-separated:
//! - `host` or `host:port`: a name (matched case-insensitively) or an IP;
//! - `10.0.0.0/8`, `10.0.0.0/8:443`, `2001:db8::/32`, `[2001:db8::/32]:443`;
//! - `https://api.example.com/hooks/`: a URL prefix (HTTP destinations):
//!   scheme, host and port must be equal, and the entry's path a prefix of
//!   the URL's in whole segments (`/hooks` allows `/hooks/1`, never
//!   `/hooksX`); both are parsed as URLs, never compared as strings;
//! - `*`: anything.
//!
//! An empty list restricts nothing, except that link-local and cloud
//! metadata addresses (169.254.0.0/16, fe80::/10, fd00:ec2::254,
//! 100.100.100.200, and IPv6 addresses that embed one of the IPv4 ones:
//! mapped, compatible, translated, NAT64, 6to4, Teredo) are refused unless
//! an IP or network entry names them:
//! a name entry or `*` is not enough, because a name is exactly what an
//! attacker controls.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

#[derive(Debug, Clone, PartialEq, Eq)]
enum HostPat {
    Name(String),
    Net(IpAddr, u8),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Rule {
    Any,
    Host { host: HostPat, port: Option<u16> },
    UrlPrefix(UrlPrefix),
}

/// A URL-prefix entry, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct UrlPrefix {
    scheme: String,
    host: String,
    port: u16,
    /// Non-empty path segments, percent-encoded as the `url` crate writes
    /// them (the URLs compared against are written the same way).
    segments: Vec<String>,
}

impl UrlPrefix {
    fn parse(u: &url::Url) -> Option<UrlPrefix> {
        Some(UrlPrefix {
            scheme: u.scheme().to_string(),
            host: u.host_str()?.to_string(),
            port: u.port_or_known_default()?,
            segments: u
                .path_segments()?
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
        })
    }

    fn allows(&self, url: &UrlPrefix) -> bool {
        self.scheme == url.scheme
            && self.host == url.host
            && self.port == url.port
            && url.segments.starts_with(&self.segments)
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Allowlist {
    rules: Vec<Rule>,
}

/// Why a destination was refused; the text names the setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused(pub String);

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

const SETTING: &str = "pg_emit.allowed_destinations";

/// Normalizes IPv4-mapped IPv6 (`::ffff:169.254.169.254`) to IPv4, so the
/// same address cannot pass in one spelling and fail in the other.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn sensitive_v4(v4: Ipv4Addr) -> bool {
    v4.is_link_local() || v4 == Ipv4Addr::new(100, 100, 100, 200)
}

/// IPv4 addresses an IPv6 address may carry and that a network on the way
/// may turn it into: IPv4-compatible (`::a.b.c.d`), -translated
/// (`::ffff:0:a.b.c.d`), NAT64 (`64:ff9b::/96`, `64:ff9b:1::/48`), 6to4
/// (`2002:AABB:CCDD::/48`) and Teredo (`2001::/32`, server and obfuscated
/// client). Mapped addresses are handled by [`canonical`].
fn embedded_v4(v6: Ipv6Addr) -> Vec<Ipv4Addr> {
    let s = v6.segments();
    let v4 = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    let last = v4(s[6], s[7]);
    let mut out = Vec::new();
    if s[..6] == [0; 6] || s[..6] == [0, 0, 0, 0, 0xffff, 0] {
        out.push(last);
    }
    if (s[0], s[1]) == (0x64, 0xff9b) && (s[2..6] == [0; 4] || s[2] == 1) {
        out.push(last);
    }
    if s[0] == 0x2002 {
        out.push(v4(s[1], s[2]));
    }
    if (s[0], s[1]) == (0x2001, 0) {
        out.push(v4(s[2], s[3]));
        out.push(v4(!s[6], !s[7]));
    }
    out
}

/// Link-local and well-known cloud metadata addresses, in any spelling.
pub fn is_sensitive(ip: IpAddr) -> bool {
    match canonical(ip) {
        IpAddr::V4(v4) => sensitive_v4(v4),
        IpAddr::V6(v6) => {
            (v6.segments()[0] & 0xffc0) == 0xfe80
                || v6 == Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
                || embedded_v4(v6).into_iter().any(sensitive_v4)
        }
    }
}

fn in_net(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (canonical(ip), net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = if bits == 0 {
                0
            } else {
                u128::MAX << (128 - bits)
            };
            u128::from(a) & mask == u128::from(n) & mask
        }
        _ => false,
    }
}

fn parse_net(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, bits) = match s.split_once('/') {
        Some((ip, bits)) => (ip, Some(bits)),
        None => (s, None),
    };
    let ip = canonical(ip.parse::<IpAddr>().ok()?);
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let bits = match bits {
        Some(b) => b.parse::<u8>().ok().filter(|b| *b <= max)?,
        None => max,
    };
    Some((ip, bits))
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_')
}

fn parse_entry(e: &str) -> Result<Rule, String> {
    if e == "*" {
        return Ok(Rule::Any);
    }
    if let Some((scheme, rest)) = e.split_once("://") {
        let scheme = scheme.to_ascii_lowercase();
        if scheme != "http" && scheme != "https" {
            return Err(format!(
                "{e:?}: only http:// and https:// URL prefixes are allowed"
            ));
        }
        if rest.is_empty() || rest.starts_with('/') {
            return Err(format!("{e:?}: URL prefix without a host"));
        }
        let u = crate::http_target::parse_url(e).map_err(|err| format!("{e:?}: {err}"))?;
        let u = url::Url::parse(&u.url).map_err(|err| format!("{e:?}: {err}"))?;
        if u.query().is_some() || u.fragment().is_some() {
            return Err(format!(
                "{e:?}: a URL prefix is scheme, host, port and path, without ? or #"
            ));
        }
        return UrlPrefix::parse(&u)
            .map(Rule::UrlPrefix)
            .ok_or_else(|| format!("{e:?}: URL prefix without a host"));
    }
    let bad = || format!("{e:?} is not a host, host:port, network or URL prefix");
    let port_of = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad);
    // [v6 or v6/bits]:port
    if let Some(rest) = e.strip_prefix('[') {
        let (inner, after) = rest.split_once(']').ok_or_else(bad)?;
        let (ip, bits) = parse_net(inner).ok_or_else(bad)?;
        let port = match after {
            "" => None,
            p => Some(port_of(p.strip_prefix(':').ok_or_else(bad)?)?),
        };
        return Ok(Rule::Host {
            host: HostPat::Net(ip, bits),
            port,
        });
    }
    // Bare IPv6 (two or more colons): no port possible.
    if e.matches(':').count() >= 2 {
        let (ip, bits) = parse_net(e).ok_or_else(bad)?;
        return Ok(Rule::Host {
            host: HostPat::Net(ip, bits),
            port: None,
        });
    }
    let (host, port) = match e.rsplit_once(':') {
        Some((h, p)) => (h, Some(port_of(p)?)),
        None => (e, None),
    };
    if let Some((ip, bits)) = parse_net(host) {
        return Ok(Rule::Host {
            host: HostPat::Net(ip, bits),
            port,
        });
    }
    if host.contains('/') || !valid_name(host) {
        return Err(bad());
    }
    Ok(Rule::Host {
        host: HostPat::Name(host.to_ascii_lowercase()),
        port,
    })
}

impl Allowlist {
    /// Parses the setting; the error names the bad entry.
    pub fn parse(s: &str) -> Result<Allowlist, String> {
        let rules = s
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .map(parse_entry)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Allowlist { rules })
    }

    fn unrestricted(&self) -> bool {
        self.rules.is_empty() || self.rules.contains(&Rule::Any)
    }

    fn name_allowed(&self, host: &str, port: u16) -> bool {
        self.rules.iter().any(|r| match r {
            Rule::Host {
                host: HostPat::Name(n),
                port: p,
            } => n.eq_ignore_ascii_case(host) && p.is_none_or(|p| p == port),
            _ => false,
        })
    }

    fn net_allows(&self, ip: IpAddr, port: u16) -> bool {
        self.rules.iter().any(|r| match r {
            Rule::Host {
                host: HostPat::Net(net, bits),
                port: p,
            } => in_net(ip, *net, *bits) && p.is_none_or(|p| p == port),
            _ => false,
        })
    }

    /// Keeps the resolved addresses of `host:port` that may be connected
    /// to. `url` is the request URL for HTTP destinations, matched against
    /// URL-prefix entries.
    pub fn filter(
        &self,
        host: &str,
        port: u16,
        url: Option<&str>,
        addrs: &[SocketAddr],
    ) -> Result<Vec<SocketAddr>, Refused> {
        let by_name = self.unrestricted()
            || self.name_allowed(host, port)
            || url.is_some_and(|u| self.url_allowed(u));
        let ok: Vec<SocketAddr> = addrs
            .iter()
            .copied()
            .filter(|a| self.net_allows(a.ip(), port) || (by_name && !is_sensitive(a.ip())))
            .collect();
        if !ok.is_empty() {
            return Ok(ok);
        }
        let list = addrs
            .iter()
            .map(|a| a.ip().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let what = url.map_or_else(|| format!("{host}:{port}"), crate::http_target::quote);
        Err(Refused(if by_name {
            format!(
                "{what} resolves to {list}: link-local and cloud metadata addresses are refused \
                 unless {SETTING} lists them as an IP or network"
            )
        } else if addrs
            .iter()
            .all(|a| a.ip().to_string() == host.trim_matches(['[', ']']))
        {
            format!("{what} is not allowed by {SETTING}")
        } else {
            format!("{what} (resolves to {list}) is not allowed by {SETTING}")
        }))
    }

    /// `url` is checked as pg_emit requests it: parsed by
    /// [`crate::http_target::parse_url`], which refuses dot segments
    /// and encoded slashes, so path segments compare exactly.
    fn url_allowed(&self, url: &str) -> bool {
        let Some(u) = crate::http_target::parse_url(url)
            .ok()
            .and_then(|u| url::Url::parse(&u.url).ok())
            .and_then(|u| UrlPrefix::parse(&u))
        else {
            return false;
        };
        self.rules.iter().any(|r| match r {
            Rule::UrlPrefix(p) => p.allows(&u),
            _ => false,
        })
    }

    /// Before any name lookup: refuses `host:port` when no address it could
    /// resolve to would pass, so that a name nobody allowed (one a hostile
    /// Kafka broker's metadata names, say) is never looked up. That holds
    /// for allowlists of names and URLs; with an address or network entry
    /// any name may resolve into it, so it is looked up and its addresses
    /// checked.
    pub fn check_name(&self, host: &str, port: u16) -> Result<(), Refused> {
        // An address needs no lookup, and [`Allowlist::filter`] says why it
        // is refused (a metadata address, say) better.
        let literal = host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok();
        if literal || self.may_allow(host, port, None) {
            Ok(())
        } else {
            Err(Refused(format!(
                "{host}:{port} is not allowed by {SETTING}"
            )))
        }
    }

    /// Early check without DNS, for triggers that send later (commit,
    /// async): false only when no address of `host` could ever pass.
    pub fn may_allow(&self, host: &str, port: u16, url: Option<&str>) -> bool {
        let literal = host.trim_matches(['[', ']']).parse::<IpAddr>().ok();
        match literal {
            Some(ip) => self
                .filter(host, port, url, &[SocketAddr::new(ip, port)])
                .is_ok(),
            None => {
                self.unrestricted()
                    || self.name_allowed(host, port)
                    || url.is_some_and(|u| self.url_allowed(u))
                    || self.rules.iter().any(|r| {
                        matches!(r, Rule::Host { host: HostPat::Net(..), port: p }
                            if p.is_none_or(|p| p == port))
                    })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn allows(list: &str, host: &str, port: u16, ips: &[&str]) -> Result<Vec<String>, String> {
        let addrs: Vec<SocketAddr> = ips
            .iter()
            .map(|ip| SocketAddr::new(ip.parse().unwrap(), port))
            .collect();
        Allowlist::parse(list)
            .unwrap()
            .filter(host, port, None, &addrs)
            .map(|v| v.iter().map(|a| a.ip().to_string()).collect())
            .map_err(|r| r.0)
    }

    #[test]
    fn empty_allows_all_but_metadata() {
        assert!(allows("", "example.com", 80, &["93.184.216.34"]).is_ok());
        let e = allows("", "169.254.169.254", 80, &["169.254.169.254"]).unwrap_err();
        assert!(e.contains("link-local") && e.contains(SETTING), "{e}");
        assert!(allows("*", "x", 80, &["fe80::1"]).is_err());
        assert!(allows("*", "x", 80, &["::ffff:169.254.169.254"]).is_err());
        assert!(allows("", "x", 80, &["fd00:ec2::254"]).is_err());
        assert!(allows("", "x", 80, &["100.100.100.200"]).is_err());
    }

    #[test]
    fn metadata_allowed_only_by_ip_or_network() {
        assert!(allows(
            "169.254.169.254",
            "169.254.169.254",
            80,
            &["169.254.169.254"]
        )
        .is_ok());
        assert!(allows("169.254.0.0/16:80", "m", 80, &["169.254.1.2"]).is_ok());
        assert!(allows(
            "metadata.internal",
            "metadata.internal",
            80,
            &["169.254.169.254"]
        )
        .is_err());
    }

    #[test]
    fn hosts_and_ports() {
        let l = "127.0.0.1:26200, receiver.local";
        assert!(allows(l, "127.0.0.1", 26200, &["127.0.0.1"]).is_ok());
        let e = allows(l, "127.0.0.1", 22, &["127.0.0.1"]).unwrap_err();
        assert_eq!(
            e,
            "127.0.0.1:22 is not allowed by pg_emit.allowed_destinations"
        );
        assert!(allows(l, "RECEIVER.local", 9, &["10.1.1.1"]).is_ok());
        assert!(allows(l, "other.local", 9, &["10.1.1.1"]).is_err());
    }

    #[test]
    fn networks_filter_resolved_addresses() {
        // localhost resolves to both; only the allowed one is kept.
        assert_eq!(
            allows("127.0.0.0/8", "localhost", 5, &["::1", "127.0.0.1"]).unwrap(),
            ["127.0.0.1"]
        );
        let e = allows("10.0.0.0/8", "localhost", 5, &["::1", "127.0.0.1"]).unwrap_err();
        assert!(e.contains("resolves to ::1, 127.0.0.1"), "{e}");
        assert!(allows("[::1/128]:5", "localhost", 5, &["::1"]).is_ok());
        assert!(allows("[::1/128]:5", "localhost", 6, &["::1"]).is_err());
        assert!(allows("2001:db8::/32", "h", 1, &["2001:db8::9"]).is_ok());
        assert!(allows("0.0.0.0/0", "h", 1, &["8.8.8.8"]).is_ok());
    }

    #[test]
    fn parse_errors_name_the_entry() {
        for bad in [
            "ftp://x/",
            "host:0",
            "host:99999",
            "a b",
            "10.0.0.0/33",
            "[::1",
            "::1/129",
            "https:///path",
            "ho/st",
            "h:1:2",
        ] {
            let e = Allowlist::parse(bad).unwrap_err();
            assert!(
                e.contains(&format!("{bad:?}")) || e.contains("URL"),
                "{bad}: {e}"
            );
        }
        assert_eq!(Allowlist::parse(" , ,").unwrap(), Allowlist::default());
    }

    #[test]
    fn url_prefixes() {
        let l = Allowlist::parse("https://API.example.com/hooks/").unwrap();
        let a = [addr("93.184.216.34:443")];
        assert!(l
            .filter(
                "api.example.com",
                443,
                Some("https://api.example.com/hooks/1"),
                &a
            )
            .is_ok());
        assert!(l
            .filter(
                "api.example.com",
                443,
                Some("https://api.example.com/admin"),
                &a
            )
            .is_err());
        assert!(l.filter("api.example.com", 443, None, &a).is_err());
    }

    #[test]
    fn url_prefixes_match_parsed_parts_not_strings() {
        let a = [addr("127.0.0.1:55560")];
        let ok = |list: &str, url: &str| {
            Allowlist::parse(list)
                .unwrap()
                .filter("h", 1, Some(url), &a)
                .is_ok()
        };
        // Port: 5556 is not a prefix of 55560.
        assert!(!ok("http://127.0.0.1:5556", "http://127.0.0.1:55560/x"));
        assert!(ok("http://127.0.0.1:5556", "http://127.0.0.1:5556/x"));
        // Host: localhost is not a prefix of localhost.evil.test.
        assert!(!ok("http://localhost", "http://localhost.evil.test/"));
        assert!(ok("http://LOCALHOST:80", "http://localhost/a"));
        // Scheme and default ports.
        assert!(!ok("https://h", "http://h:443/"));
        assert!(ok("https://h:443", "https://h/"));
        // Path: whole segments.
        assert!(ok("http://h/pg/", "http://h/pg/x"));
        assert!(ok("http://h/pg", "http://h/pg/x/y"));
        assert!(ok("http://h/pg", "http://h/pg"));
        assert!(!ok("http://h/pg", "http://h/pgx"));
        assert!(!ok("http://h/pg/", "http://h/admin"));
        // Dot segments and encoded separators never match anything.
        for sneaky in [
            "http://h/pg/../admin",
            "http://h/pg/%2e%2e/admin",
            "http://h/pg/%2E%2e/admin",
            "http://h/pg/..%2fadmin",
            "http://h/pg/.%2E/admin",
            "http://h/pg\\..\\admin",
        ] {
            assert!(!ok("http://h/pg/", sneaky), "{sneaky}");
        }
        for bad in [
            "http://h/?q=1",
            "http://h/#f",
            "http://h:0/",
            "http://h/../x",
        ] {
            assert!(Allowlist::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn embedded_ipv4_metadata_is_sensitive() {
        for v6 in [
            "::a9fe:a9fe",
            "::ffff:0:a9fe:a9fe",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b:1::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "2001:0:a9fe:a9fe::1",
            "2001:0:1:2:0:0:5601:5601",
            "::6464:64c8",
        ] {
            let ip: IpAddr = v6.parse().unwrap();
            assert!(is_sensitive(ip), "{v6}");
            assert!(allows("*", "x", 80, &[v6]).is_err(), "{v6}");
        }
        for fine in ["::1", "2001:db8::1", "64:ff9b::808:808", "2002:808:808::1"] {
            assert!(!is_sensitive(fine.parse().unwrap()), "{fine}");
        }
    }

    #[test]
    fn early_check_without_dns() {
        let l = Allowlist::parse("10.0.0.0/8:443").unwrap();
        assert!(!l.may_allow("127.0.0.1", 443, None));
        assert!(l.may_allow("some.name", 443, None)); // could resolve into 10/8
        assert!(!l.may_allow("some.name", 80, None));
        assert!(!Allowlist::default().may_allow("169.254.169.254", 80, None));
    }
}

#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    fn any_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            any::<u32>().prop_map(|v| IpAddr::V4(Ipv4Addr::from(v))),
            any::<u128>().prop_map(|v| IpAddr::V6(Ipv6Addr::from(v))),
            // Bias towards the interesting ranges.
            (0u8..=255, 0u8..=255).prop_map(|(a, b)| IpAddr::V4(Ipv4Addr::new(169, 254, a, b))),
            any::<u16>().prop_map(|v| IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, v))),
        ]
    }

    proptest! {
        #[test]
        fn arbitrary_lists_never_panic(list in "[-a-z0-9.:/\\[\\]*, ]{0,60}") {
            let _ = Allowlist::parse(&list);
        }

        #[test]
        fn sensitive_addresses_need_an_explicit_network(
            list in "(\\*|[a-z]{1,8}(\\.local)?(:[1-9][0-9]{0,3})?)(, ?(\\*|[a-z]{1,8}))?",
            ip in any_ip(),
            port in 1u16..,
        ) {
            // Name entries and * never let a metadata address through.
            let l = Allowlist::parse(&list).unwrap();
            let r = l.filter("h", port, None, &[SocketAddr::new(ip, port)]);
            if is_sensitive(ip) {
                prop_assert!(r.is_err());
            }
        }

        #[test]
        fn filter_only_returns_given_addresses(
            list in "[0-9./:,]{0,30}",
            ips in proptest::collection::vec(any_ip(), 1..4),
            port in 1u16..,
        ) {
            if let Ok(l) = Allowlist::parse(&list) {
                let addrs: Vec<SocketAddr> = ips.iter().map(|i| SocketAddr::new(*i, port)).collect();
                if let Ok(ok) = l.filter("h", port, Some("http://h/"), &addrs) {
                    prop_assert!(ok.iter().all(|a| addrs.contains(a)));
                }
                let _ = l.may_allow("h", port, None);
            }
        }
    }
}
