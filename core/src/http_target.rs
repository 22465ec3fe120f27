//! What a caller gives for an HTTP destination, checked before anything
//! is sent or queued: its URL, headers, method and content type. Apart
//! from the HTTP transport ([`crate::transport::http`]) because the
//! destinations, the allowlist and the transport all read URLs this way,
//! and none of them should depend on another for it.

/// Every value quoted in a [`UrlError`] is cut to this many characters, so
/// a 100 kB argument does not come back in full in the error.
const QUOTE_CHARS: usize = 120;

/// `s` for an error message: at most [`QUOTE_CHARS`] characters.
pub fn quote(s: &str) -> String {
    match s.char_indices().nth(QUOTE_CHARS) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("url {:?} is not a valid absolute URL", quote(.0))]
    Invalid(String),
    #[error("url {:?}: the port must be an integer between 1 and 65535", quote(.0))]
    Port(String),
    #[error("url {:?}: only http and https are supported", quote(.0))]
    Scheme(String),
    #[error("url {:?} must not contain user credentials; send them in a header", quote(.0))]
    Credentials(String),
    #[error(
        "url {:?}: the path must not contain \".\" or \"..\" segments, backslashes or encoded \
         slashes (the receiver could resolve them to a path the allowlist does not allow)",
        quote(.0)
    )]
    Path(String),
    #[error(
        "header {:?} is not of the form \"Name: value\" with a valid name and printable value",
        quote(.0)
    )]
    Header(String),
    #[error("{0}")]
    Headers(String),
    #[error(
        "header {:?} cannot be set by the caller: pg_emit sets it itself (connection, framing \
         and signature headers)",
        quote(.0)
    )]
    ReservedHeader(String),
    #[error("method {:?} is not a valid HTTP method", quote(.0))]
    Method(String),
    #[error("content type {:?} contains a control character", quote(.0))]
    ContentType(String),
}

/// A checked destination URL: scheme, host and port resolved from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub url: String,
    pub host: String,
    pub port: u16,
}

/// Checks `input` and returns it normalised (as the `url` crate writes it:
/// lowercase scheme and host, default port dropped, empty path as `/`):
/// the string that is checked against the allowlist is the one requested.
pub fn parse_url(input: &str) -> Result<Url, UrlError> {
    let invalid = || UrlError::Invalid(input.to_string());
    if input.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(invalid());
    }
    let u = url::Url::parse(input).map_err(|e| match e {
        url::ParseError::InvalidPort => UrlError::Port(input.to_string()),
        _ => invalid(),
    })?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(UrlError::Scheme(input.to_string()));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(UrlError::Credentials(input.to_string()));
    }
    if has_path_tricks(input) {
        return Err(UrlError::Path(input.to_string()));
    }
    let host = u
        .host_str()
        .map(|h| h.trim_matches(['[', ']']).to_string())
        .filter(|h| !h.is_empty())
        .ok_or_else(invalid)?;
    let port = u.port_or_known_default().ok_or_else(invalid)?;
    if port == 0 {
        return Err(UrlError::Port(input.to_string()));
    }
    Ok(Url {
        url: u.as_str().to_string(),
        host,
        port,
    })
}

/// Whether the path of `input` (as written, before any normalisation)
/// holds a dot segment, also percent-encoded, a backslash, or an encoded
/// `/` or `\`: spellings a receiver may resolve to another path than the
/// one an allowlist entry names.
fn has_path_tricks(input: &str) -> bool {
    let after_scheme = input.split_once("://").map_or(input, |(_, r)| r);
    let path_start = after_scheme.find(['/', '?', '#', '\\']);
    let Some(start) = path_start else {
        return false;
    };
    let rest = &after_scheme[start..];
    let path = &rest[..rest.find(['?', '#']).unwrap_or(rest.len())];
    let lower = path.to_ascii_lowercase();
    if ["\\", "%2f", "%5c", "%00"]
        .iter()
        .any(|t| lower.contains(t))
    {
        return true;
    }
    // Some servers (Tomcat, Spring) drop a `;parameter` from a segment
    // before resolving it, so `..;x` is `..` to them.
    lower
        .split('/')
        .map(|seg| seg.replace("%2e", ".").replace("%3b", ";"))
        .any(|seg| matches!(seg.split(';').next(), Some("." | "..")))
}

/// Parses `Name: value`, refusing anything that could split a header
/// (CR, LF or other control characters) or is not a valid header name.
pub fn parse_header(h: &str) -> Result<(String, String), UrlError> {
    let bad = || UrlError::Header(h.to_string());
    let (name, value) = h.split_once(':').ok_or_else(bad)?;
    let (name, value) = (name.trim(), value.trim());
    check_header(name, value).map_err(|_| bad())?;
    Ok((name.to_string(), value.to_string()))
}

/// Headers a caller may not set: the request's routing and framing
/// (which pg_emit owns, and `Host` would let a caller reach another
/// virtual host than the URL the allowlist checked), hop-by-hop headers,
/// and signatures, which only pg_emit may produce.
const RESERVED_HEADERS: &[&str] = &[
    "host",
    "content-length",
    "content-type",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "expect",
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
];

pub fn check_header(name: &str, value: &str) -> Result<(), UrlError> {
    let token = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
    if name.is_empty()
        || !name.chars().all(token)
        || value.chars().any(|c| c.is_control() && c != '\t')
    {
        return Err(UrlError::Header(format!("{name}: {value}")));
    }
    let lower = name.to_ascii_lowercase();
    if RESERVED_HEADERS.contains(&lower.as_str()) || lower.starts_with("x-emit-") {
        return Err(UrlError::ReservedHeader(name.to_string()));
    }
    Ok(())
}

pub fn check_content_type(ct: &str) -> Result<(), UrlError> {
    if ct.chars().any(char::is_control) {
        return Err(UrlError::ContentType(ct.to_string()));
    }
    Ok(())
}

pub fn check_method(m: &str) -> Result<(), UrlError> {
    if m.is_empty() || !m.chars().all(|c| c.is_ascii_uppercase()) {
        return Err(UrlError::Method(m.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_headers_and_methods_are_validated() {
        assert_eq!(
            parse_url("https://h.example:8443/x?y=1").unwrap().port,
            8443
        );
        assert_eq!(parse_url("http://[::1]/").unwrap().host, "::1");
        for bad in [
            "ftp://h/",
            "h/path",
            "http://",
            "http://a b/",
            "http://u:p@h/",
            "http://h/\r\nX: y",
            "",
        ] {
            assert!(parse_url(bad).is_err(), "{bad:?}");
        }
        assert!(matches!(
            parse_url("file:///etc/passwd"),
            Err(UrlError::Scheme(_) | UrlError::Invalid(_))
        ));
        assert_eq!(
            parse_header("X-A: b c").unwrap(),
            ("X-A".into(), "b c".into())
        );
        for bad in [
            "X-A b",
            "X A: b",
            "X-A: b\r\nInjected: 1",
            ": v",
            "X-A: \u{0}",
        ] {
            assert!(parse_header(bad).is_err(), "{bad:?}");
        }
        assert!(
            check_method("PUT").is_ok()
                && check_method("get").is_err()
                && check_method("P T").is_err()
        );
    }

    #[test]
    fn urls_are_parsed_strictly() {
        for port in ["65536", "99999999", "-5", "0"] {
            let u = format!("http://127.0.0.1:{port}/");
            assert!(
                matches!(parse_url(&u), Err(UrlError::Port(_) | UrlError::Invalid(_))),
                "{u}"
            );
        }
        for tricky in [
            "http://h/pg/../admin",
            "http://h/pg/%2e%2e/admin",
            "http://h/pg/..%2fadmin",
            "http://h/pg/%5cadmin",
            "http://h/./x",
            "http://h/pg/..;/admin",
            "http://h/pg/..%3bx/admin",
            "http://h/pg/.;x/admin",
            "http://h/pg/a%00b",
            "http://h\\x",
        ] {
            assert!(
                matches!(parse_url(tricky), Err(UrlError::Path(_))),
                "{tricky}: {:?}",
                parse_url(tricky)
            );
        }
        // Dots inside a segment, and in the query, are ordinary.
        assert!(parse_url("http://h/a..b/.well-known?x=../y").is_ok());
        assert!(parse_url("http://h/a;b=1/c").is_ok());
        let u = parse_url("HTTP://Example.COM:80").unwrap();
        assert_eq!((u.url.as_str(), u.port), ("http://example.com/", 80));
        assert_eq!(
            parse_url("http://[::a9fe:a9fe]/").unwrap().host,
            "::a9fe:a9fe"
        );
    }

    #[test]
    fn callers_cannot_set_routing_or_signature_headers() {
        for name in [
            "Host",
            "host",
            "Content-Length",
            "Transfer-Encoding",
            "Connection",
            "X-Emit-Signature",
            "x-emit-timestamp",
            "webhook-signature",
            "Proxy-Authorization",
        ] {
            assert!(
                matches!(check_header(name, "x"), Err(UrlError::ReservedHeader(_))),
                "{name}"
            );
        }
        assert!(check_header("Authorization", "Bearer t").is_ok());
    }

    #[test]
    fn long_values_are_cut_in_errors() {
        let method = "X".repeat(100_000) + "a";
        let e = check_method(&method).unwrap_err().to_string();
        assert!(e.len() < 300, "{}", e.len());
    }
}
