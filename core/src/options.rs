//! Trigger arguments.
//!
//! `row_to_socket(host, port [, 'key=value' ...])` and
//! `row_to_http(url [, 'key=value' ...])`. PostgreSQL stores trigger
//! arguments as plain strings and cannot check them at `CREATE TRIGGER`, so
//! the first firing is where a typo surfaces. Every mistake is reported with
//! the 1-based argument position as the DBA wrote it, so `CREATE TRIGGER`
//! lines with five arguments stay easy to fix; nothing falls back to a
//! silent default.

use std::fmt;

/// When an event leaves the database (see the delivery-modes table in the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Sync,
    Commit,
    Async,
}

impl Delivery {
    pub fn name(self) -> &'static str {
        match self {
            Delivery::Sync => "sync",
            Delivery::Commit => "commit",
            Delivery::Async => "async",
        }
    }
}

/// Shape of the event JSON (see the README's format table).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    /// `{"op","schema","table","new","old"}`.
    #[default]
    Json,
    /// plpython's `TD` dictionary key names, for receivers of the old recipe.
    Td,
    /// Supabase Database Webhooks' `{"type","table","schema","record","old_record"}`.
    Supabase,
    /// The value of a Debezium change event (`before`, `after`, `source`, `op`, `ts_ms`).
    Debezium,
    /// A CloudEvents 1.0 structured-mode event whose `data` is the `json` envelope.
    CloudEvents,
    /// The same event in CloudEvents' HTTP binary mode: attributes as
    /// `ce-*` headers, the body only `data`. Queued like
    /// [`Format::CloudEvents`] and split when sent.
    CloudEventsBinary,
}

impl Format {
    /// As `format=` and `emit.outbox.format` spell it.
    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Td => "td",
            Format::Supabase => "supabase",
            Format::Debezium => "debezium",
            Format::CloudEvents => "cloudevents",
            Format::CloudEventsBinary => "cloudevents-binary",
        }
    }

    /// The inverse of [`Format::name`].
    pub fn from_name(name: &str) -> Option<Format> {
        [
            Format::Json,
            Format::Td,
            Format::Supabase,
            Format::Debezium,
            Format::CloudEvents,
            Format::CloudEventsBinary,
        ]
        .into_iter()
        .find(|f| f.name() == name)
    }

    pub fn is_cloudevents(self) -> bool {
        matches!(self, Format::CloudEvents | Format::CloudEventsBinary)
    }

    /// Whether events say when, where and in which transaction they were
    /// made (Debezium's `source`, CloudEvents' `time`).
    pub fn needs_context(self) -> bool {
        matches!(self, Format::Debezium) || self.is_cloudevents()
    }

    /// How a format given by a trigger (`format=`, `cloudevents=`) and one
    /// given by its stored destination combine: the trigger's wins, and
    /// `cloudevents=binary|structured` picks the content mode of whichever
    /// CloudEvents format applies. Binary mode exists over HTTP only.
    pub fn combine(
        trigger: Option<Format>,
        binary: Option<bool>,
        stored: Option<Format>,
        http: bool,
    ) -> Result<Format, OptionError> {
        let format = trigger.or(stored).unwrap_or_default();
        let format = match (binary, format.is_cloudevents()) {
            (None, _) => format,
            (Some(b), true) if b => Format::CloudEventsBinary,
            (Some(_), true) => Format::CloudEvents,
            (Some(_), false) => {
                return Err(OptionError::Destination(format!(
                    "cloudevents= applies to format=cloudevents, not format={}",
                    format.name()
                )))
            }
        };
        if format == Format::CloudEventsBinary && !http {
            return Err(OptionError::Destination(
                "cloudevents=binary puts attributes in HTTP headers; this destination is not \
                 http(s)://"
                    .into(),
            ));
        }
        Ok(format)
    }
}

/// How messages are delimited on a TCP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Framing {
    /// One connection per message; end-of-stream marks the end, exactly as
    /// the plpython recipe did.
    #[default]
    Close,
    /// One kept-open connection per destination, one JSON document per line.
    Ndjson,
}

/// `unchanged=`: what an UPDATE that changes none of the columns its event
/// carries sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Unchanged {
    /// An event, as for any UPDATE.
    #[default]
    Send,
    /// Nothing.
    Skip,
}

/// Which columns a row event carries in `new` and `old`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Columns {
    /// Every column of the table.
    #[default]
    All,
    /// `columns=a,b`: these, in this order.
    Only(Vec<String>),
    /// `exclude=a,b`: every column but these, in the table's order.
    Except(Vec<String>),
}

/// What a table's row events carry and which columns key them, given as
/// JSON where there is no trigger to give them (capture's `tables`,
/// backfill's options): `key`, and `columns` or `exclude`, each an array
/// of column names or a comma-separated list as trigger options take them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Shape {
    /// The ordering key's columns, in this order (default: the replica
    /// identity's).
    pub key: Option<Vec<String>>,
    pub columns: Columns,
}

impl Shape {
    /// The shape `map` gives (its other entries are the caller's); the
    /// error names the option.
    pub fn from_json(map: &serde_json::Map<String, serde_json::Value>) -> Result<Shape, String> {
        let list = |name: &str| -> Result<Option<Vec<String>>, String> {
            let bad = || format!("{name} is not {COLUMN_LIST} or an array of column names");
            match map.get(name) {
                None => Ok(None),
                Some(serde_json::Value::String(s)) => column_list(s).map(Some).ok_or_else(bad),
                // As given: a name may hold a comma or spaces here.
                Some(serde_json::Value::Array(a)) => {
                    let names: Option<Vec<String>> = a
                        .iter()
                        .map(|v| v.as_str().filter(|s| !s.is_empty()).map(str::to_string))
                        .collect();
                    match names {
                        Some(n)
                            if !n.is_empty()
                                && !n.iter().enumerate().any(|(i, c)| n[..i].contains(c)) =>
                        {
                            Ok(Some(n))
                        }
                        _ => Err(bad()),
                    }
                }
                Some(_) => Err(bad()),
            }
        };
        let columns = match (list("columns")?, list("exclude")?) {
            (Some(_), Some(_)) => return Err("columns and exclude cannot both be given".into()),
            (Some(c), None) => Columns::Only(c),
            (None, Some(e)) => Columns::Except(e),
            (None, None) => Columns::All,
        };
        Ok(Shape {
            key: list("key")?,
            columns,
        })
    }

    /// As JSON again (arrays), for storing.
    pub fn to_json(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        if let Some(k) = &self.key {
            m.insert("key".into(), k.clone().into());
        }
        match &self.columns {
            Columns::All => {}
            Columns::Only(c) => {
                m.insert("columns".into(), c.clone().into());
            }
            Columns::Except(e) => {
                m.insert("exclude".into(), e.clone().into());
            }
        }
        m
    }
}

/// Parsed `'key=value'` options. `delivery` stays `None` when not given so
/// that `pg_emit.default_delivery` is read at firing time, not frozen.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Options {
    pub delivery: Option<Delivery>,
    /// `None` when not given: a stored destination's own format applies.
    pub format: Option<Format>,
    /// `cloudevents=binary` (true) or `structured`: see [`Format::combine`].
    pub cloudevents: Option<bool>,
    pub framing: Framing,
    /// `header=Name: value` (row_to_http only), in order.
    pub headers: Vec<(String, String)>,
    /// `key=col[,col...]`: the columns whose values order async events
    /// (default: the table's replica identity, its primary key).
    pub key: Option<Vec<String>>,
    /// `columns=` or `exclude=`.
    pub columns: Columns,
    /// `unchanged=send|skip`.
    pub unchanged: Unchanged,
}

/// Which trigger the options belong to: each accepts its own keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Socket,
    Http,
    /// `row_to_destination`: framing and headers belong to the URL or the
    /// stored destination.
    Destination,
}

impl Kind {
    fn known(self) -> &'static str {
        match self {
            Kind::Socket => "columns, delivery, exclude, format, framing, key, unchanged",
            Kind::Http => "cloudevents, columns, delivery, exclude, format, header, key, unchanged",
            Kind::Destination => "cloudevents, columns, delivery, exclude, format, key, unchanged",
        }
    }
}

/// `url` as given to `row_to_http`, after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpTarget {
    pub url: crate::http_target::Url,
    pub options: Options,
}

/// `host` and `port` as given to `row_to_socket`, after validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketTarget {
    pub host: String,
    pub port: u16,
    pub options: Options,
}

/// Longest host name DNS can carry (RFC 1035 limits names to 253
/// characters plus the dot); anything longer is a mistake or an attack.
pub const MAX_HOST_LEN: usize = 255;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OptionError {
    #[error("missing host: expected arguments (host, port [, 'key=value' ...])")]
    MissingHost,
    #[error("missing port: expected arguments (host, port [, 'key=value' ...])")]
    MissingPort,
    #[error("host must not be empty")]
    EmptyHost,
    #[error("host is {0} bytes long; the limit is 255")]
    HostTooLong(usize),
    #[error("host {0:?} contains a control character or whitespace")]
    HostBadChar(String),
    #[error("host {0:?} is neither a name nor an IP address (give the port separately)")]
    HostWithPort(String),
    #[error("port {0:?} is not an integer between 1 and 65535")]
    BadPort(String),
    #[error("argument {pos} {arg:?} is not of the form key=value")]
    Malformed { pos: usize, arg: String },
    #[error("argument {pos}: unknown option {key:?} (known options: {known})")]
    UnknownKey {
        pos: usize,
        key: String,
        known: &'static str,
    },
    #[error("missing url: expected arguments (url [, 'key=value' ...])")]
    MissingUrl,
    #[error("missing destination: expected arguments (destination [, 'key=value' ...]), a URL or a stored destination's name")]
    MissingDestination,
    #[error("{0}")]
    Url(#[from] crate::http_target::UrlError),
    #[error("argument {pos}: {source}")]
    Header {
        pos: usize,
        source: crate::http_target::UrlError,
    },
    #[error("argument {pos}: {key}={value:?} is not valid (expected {expected})")]
    BadValue {
        pos: usize,
        key: &'static str,
        value: String,
        expected: &'static str,
    },
    #[error("argument {pos}: option {key:?} is given twice")]
    Duplicate { pos: usize, key: &'static str },
    #[error("argument {pos}: columns= and exclude= cannot both be given")]
    ColumnsAndExclude { pos: usize },
    #[error("{0}")]
    Destination(String),
}

/// Validates a host as given by a user: the network layer only sees names
/// that could be real, so error messages can blame the argument rather than
/// a later "host not found".
pub fn check_host(host: &str) -> Result<(), OptionError> {
    if host.is_empty() {
        return Err(OptionError::EmptyHost);
    }
    if host.len() > MAX_HOST_LEN {
        return Err(OptionError::HostTooLong(host.len()));
    }
    if host.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(OptionError::HostBadChar(host.to_string()));
    }
    // A colon only belongs in an IPv6 address; `10.0.0.1:22` or
    // `[::1]:22` would smuggle a second port past the port argument.
    if host.contains([':', '/', '@', '[', ']']) {
        let bare = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        if bare.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(OptionError::HostWithPort(host.to_string()));
        }
    }
    Ok(())
}

/// Port from an SQL integer argument.
pub fn check_port(port: i32) -> Result<u16, OptionError> {
    u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| OptionError::BadPort(port.to_string()))
}

/// Port from a trigger argument (text).
pub fn parse_port(port: &str) -> Result<u16, OptionError> {
    port.trim()
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| OptionError::BadPort(port.to_string()))
}

/// Parses `row_to_socket` trigger arguments.
pub fn parse_socket_args<S: AsRef<str>>(args: &[S]) -> Result<SocketTarget, OptionError> {
    let host = args.first().ok_or(OptionError::MissingHost)?.as_ref();
    check_host(host)?;
    let port = parse_port(args.get(1).ok_or(OptionError::MissingPort)?.as_ref())?;
    let options = parse_options(&args[2..], 3, Kind::Socket)?;
    Ok(SocketTarget {
        host: host.to_string(),
        port,
        options,
    })
}

/// Parses `row_to_http` trigger arguments.
pub fn parse_http_args<S: AsRef<str>>(args: &[S]) -> Result<HttpTarget, OptionError> {
    let url = args.first().ok_or(OptionError::MissingUrl)?.as_ref();
    let url = crate::http_target::parse_url(url)?;
    let options = parse_options(&args[1..], 2, Kind::Http)?;
    Ok(HttpTarget { url, options })
}

/// Parses `'key=value'` arguments; `first_pos` is the 1-based position of
/// the first of them among all trigger arguments.
pub fn parse_options<S: AsRef<str>>(
    args: &[S],
    first_pos: usize,
    kind: Kind,
) -> Result<Options, OptionError> {
    let mut opts = Options::default();
    let mut seen = [false; 8];
    for (i, arg) in args.iter().enumerate() {
        let pos = first_pos + i;
        let arg = arg.as_ref();
        let (key, value) = arg
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim()))
            .filter(|(k, _)| !k.is_empty())
            .ok_or_else(|| OptionError::Malformed {
                pos,
                arg: arg.to_string(),
            })?;
        let bad = |key: &'static str, expected: &'static str| OptionError::BadValue {
            pos,
            key,
            value: value.to_string(),
            expected,
        };
        let slot = match key.to_ascii_lowercase().as_str() {
            // Repeatable: one header per argument.
            "header" if kind == Kind::Http => {
                let h = crate::http_target::parse_header(value)
                    .map_err(|source| OptionError::Header { pos, source })?;
                opts.headers.push(h);
                continue;
            }
            "delivery" => {
                opts.delivery = Some(match value.to_ascii_lowercase().as_str() {
                    "sync" => Delivery::Sync,
                    "commit" => Delivery::Commit,
                    "async" => Delivery::Async,
                    _ => return Err(bad("delivery", "sync, commit or async")),
                });
                (0, "delivery")
            }
            "format" => {
                opts.format = Some(
                    Format::from_name(&value.to_ascii_lowercase())
                        .filter(|f| *f != Format::CloudEventsBinary)
                        .ok_or_else(|| {
                            bad("format", "json, td, supabase, debezium or cloudevents")
                        })?,
                );
                (1, "format")
            }
            "cloudevents" if kind != Kind::Socket => {
                opts.cloudevents = Some(match value.to_ascii_lowercase().as_str() {
                    "binary" => true,
                    "structured" => false,
                    _ => return Err(bad("cloudevents", "binary or structured")),
                });
                (4, "cloudevents")
            }
            "key" => {
                opts.key = Some(column_list(value).ok_or_else(|| bad("key", COLUMN_LIST))?);
                (3, "key")
            }
            "columns" | "exclude" => {
                let only = key.eq_ignore_ascii_case("columns");
                match (&opts.columns, only) {
                    (Columns::All, _) => {}
                    (Columns::Only(_), true) => {
                        return Err(OptionError::Duplicate {
                            pos,
                            key: "columns",
                        })
                    }
                    (Columns::Except(_), false) => {
                        return Err(OptionError::Duplicate {
                            pos,
                            key: "exclude",
                        })
                    }
                    _ => return Err(OptionError::ColumnsAndExclude { pos }),
                }
                if only {
                    opts.columns = Columns::Only(
                        column_list(value).ok_or_else(|| bad("columns", COLUMN_LIST))?,
                    );
                } else {
                    opts.columns = Columns::Except(
                        column_list(value).ok_or_else(|| bad("exclude", COLUMN_LIST))?,
                    );
                }
                (5, "columns")
            }
            "unchanged" => {
                opts.unchanged = match value.to_ascii_lowercase().as_str() {
                    "send" => Unchanged::Send,
                    "skip" => Unchanged::Skip,
                    _ => return Err(bad("unchanged", "send or skip")),
                };
                (6, "unchanged")
            }
            "framing" if kind == Kind::Socket => {
                opts.framing = match value.to_ascii_lowercase().as_str() {
                    "close" => Framing::Close,
                    "ndjson" => Framing::Ndjson,
                    _ => return Err(bad("framing", "close or ndjson")),
                };
                (2, "framing")
            }
            _ => {
                return Err(OptionError::UnknownKey {
                    pos,
                    key: key.to_string(),
                    known: kind.known(),
                })
            }
        };
        if std::mem::replace(&mut seen[slot.0], true) {
            return Err(OptionError::Duplicate { pos, key: slot.1 });
        }
    }
    Ok(opts)
}

const COLUMN_LIST: &str = "column names separated by commas";

/// `a, b,c` as column names, exactly as spelled (PostgreSQL's names are
/// case-sensitive once stored); `None` for an empty name or a repeat.
fn column_list(value: &str) -> Option<Vec<String>> {
    let cols: Vec<String> = value.split(',').map(|c| c.trim().to_string()).collect();
    let repeated = cols.iter().enumerate().any(|(i, c)| cols[..i].contains(c));
    (!cols.iter().any(String::is_empty) && !repeated).then_some(cols)
}

impl fmt::Display for Framing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Framing::Close => "close",
            Framing::Ndjson => "ndjson",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_from_json() {
        let shape = |j: serde_json::Value| Shape::from_json(j.as_object().unwrap());
        assert_eq!(shape(serde_json::json!({})).unwrap(), Shape::default());
        let s = shape(serde_json::json!({"key": "tenant, id", "columns": ["id", "b"]})).unwrap();
        assert_eq!(s.key, Some(vec!["tenant".into(), "id".into()]));
        assert_eq!(s.columns, Columns::Only(vec!["id".into(), "b".into()]));
        assert_eq!(Shape::from_json(&s.to_json()).unwrap(), s);
        // An array takes names as they are.
        let odd = shape(serde_json::json!({"columns": ["a,b", " c"]})).unwrap();
        assert_eq!(odd.columns, Columns::Only(vec!["a,b".into(), " c".into()]));
        let e = shape(serde_json::json!({"exclude": "secret"})).unwrap();
        assert_eq!(e.columns, Columns::Except(vec!["secret".into()]));
        for bad in [
            serde_json::json!({"columns": "a", "exclude": "b"}),
            serde_json::json!({"key": []}),
            serde_json::json!({"key": "a,,b"}),
            serde_json::json!({"columns": ["a", "a"]}),
            serde_json::json!({"columns": [""]}),
            serde_json::json!({"exclude": 5}),
        ] {
            assert!(shape(bad.clone()).is_err(), "{bad}");
        }
        assert_eq!(
            shape(serde_json::json!({"key": 1})).unwrap_err(),
            format!("key is not {COLUMN_LIST} or an array of column names")
        );
    }

    #[test]
    fn formats_combine() {
        let c = Format::combine;
        assert_eq!(c(None, None, None, false), Ok(Format::Json));
        assert_eq!(
            c(Some(Format::Td), None, Some(Format::Supabase), true),
            Ok(Format::Td)
        );
        assert_eq!(
            c(None, None, Some(Format::Debezium), false),
            Ok(Format::Debezium)
        );
        assert_eq!(
            c(None, Some(true), Some(Format::CloudEvents), true),
            Ok(Format::CloudEventsBinary)
        );
        assert_eq!(
            c(None, Some(false), Some(Format::CloudEventsBinary), true),
            Ok(Format::CloudEvents)
        );
        assert_eq!(
            c(None, None, Some(Format::CloudEventsBinary), true),
            Ok(Format::CloudEventsBinary)
        );
        let e = c(Some(Format::Json), Some(true), None, true).unwrap_err();
        assert!(e.to_string().contains("format=cloudevents"), "{e}");
        let e = c(Some(Format::CloudEvents), Some(true), None, false).unwrap_err();
        assert!(e.to_string().contains("not http"), "{e}");
        for f in [
            "json",
            "td",
            "supabase",
            "debezium",
            "cloudevents",
            "cloudevents-binary",
        ] {
            assert_eq!(Format::from_name(f).map(Format::name), Some(f));
        }
    }

    #[test]
    fn format_options() {
        let o =
            parse_options(&["format=CloudEvents", "cloudevents=binary"], 2, Kind::Http).unwrap();
        assert_eq!(
            (o.format, o.cloudevents),
            (Some(Format::CloudEvents), Some(true))
        );
        assert!(matches!(
            parse_options(&["format=cloudevents-binary"], 2, Kind::Http),
            Err(OptionError::BadValue { key: "format", .. })
        ));
        assert!(matches!(
            parse_options(&["cloudevents=binary"], 3, Kind::Socket),
            Err(OptionError::UnknownKey { .. })
        ));
        assert!(matches!(
            parse_options(&["cloudevents=yes"], 2, Kind::Destination),
            Err(OptionError::BadValue {
                key: "cloudevents",
                ..
            })
        ));
    }

    #[test]
    fn host_and_port_only() {
        let t = parse_socket_args(&["127.0.0.1", "26200"]).unwrap();
        assert_eq!(t.host, "127.0.0.1");
        assert_eq!(t.port, 26200);
        assert_eq!(t.options, Options::default());
    }

    #[test]
    fn all_options() {
        let t = parse_socket_args(&[
            "::1",
            "1",
            "delivery=commit",
            " format = TD ",
            "framing=ndjson",
        ])
        .unwrap();
        assert_eq!(t.port, 1);
        assert_eq!(t.options.delivery, Some(Delivery::Commit));
        assert_eq!(t.options.format, Some(Format::Td));
        assert_eq!(t.options.framing, Framing::Ndjson);
    }

    #[test]
    fn missing_arguments() {
        assert_eq!(
            parse_socket_args::<&str>(&[]),
            Err(OptionError::MissingHost)
        );
        assert_eq!(
            parse_socket_args(&["localhost"]),
            Err(OptionError::MissingPort)
        );
        assert_eq!(parse_socket_args(&["", "1"]), Err(OptionError::EmptyHost));
    }

    #[test]
    fn bad_ports() {
        for p in ["0", "65536", "-1", "http", "", "12.5", "99999999999"] {
            assert_eq!(
                parse_socket_args(&["h", p]),
                Err(OptionError::BadPort(p.into())),
                "{p}"
            );
        }
        assert_eq!(check_port(0), Err(OptionError::BadPort("0".into())));
        assert_eq!(check_port(65536), Err(OptionError::BadPort("65536".into())));
        assert_eq!(check_port(65535), Ok(65535));
    }

    #[test]
    fn bad_hosts() {
        let long = "a".repeat(256);
        assert_eq!(check_host(&long), Err(OptionError::HostTooLong(256)));
        assert!(matches!(
            check_host("a b"),
            Err(OptionError::HostBadChar(_))
        ));
        assert!(matches!(
            check_host("a\r\nb"),
            Err(OptionError::HostBadChar(_))
        ));
        assert!(check_host("example.com").is_ok());
        for smuggled in ["10.0.0.1:22", "[::1]:22", "user@host", "h/x", "a]b"] {
            assert!(
                matches!(check_host(smuggled), Err(OptionError::HostWithPort(_))),
                "{smuggled}"
            );
        }
        assert!(check_host("::1").is_ok() && check_host("[fe80::1]").is_ok());
    }

    #[test]
    fn option_errors_name_the_argument() {
        assert_eq!(
            parse_socket_args(&["h", "1", "format=json", "fromat=td"]),
            Err(OptionError::UnknownKey {
                pos: 4,
                key: "fromat".into(),
                known: "columns, delivery, exclude, format, framing, key, unchanged"
            })
        );
        assert_eq!(
            parse_socket_args(&["h", "1", "ndjson"]),
            Err(OptionError::Malformed {
                pos: 3,
                arg: "ndjson".into()
            })
        );
        assert_eq!(
            parse_socket_args(&["h", "1", "=x"]),
            Err(OptionError::Malformed {
                pos: 3,
                arg: "=x".into()
            })
        );
        assert_eq!(
            parse_socket_args(&["h", "1", "delivery=later"]),
            Err(OptionError::BadValue {
                pos: 3,
                key: "delivery",
                value: "later".into(),
                expected: "sync, commit or async"
            })
        );
        assert_eq!(
            parse_socket_args(&["h", "1", "format=td", "format=json"]),
            Err(OptionError::Duplicate {
                pos: 4,
                key: "format"
            })
        );
    }

    #[test]
    fn http_arguments() {
        let t = parse_http_args(&[
            "https://hooks.example/x",
            "delivery=async",
            "header=Authorization: Bearer t",
            "header=X-Tenant: 7",
        ])
        .unwrap();
        assert_eq!(t.url.port, 443);
        assert_eq!(t.options.delivery, Some(Delivery::Async));
        assert_eq!(t.options.headers.len(), 2);
        assert!(matches!(
            parse_http_args(&["https://h/", "framing=ndjson"]),
            Err(OptionError::UnknownKey { pos: 2, .. })
        ));
        assert!(matches!(
            parse_http_args(&["https://h/", "header=X: a\r\nB: c"]),
            Err(OptionError::Header { pos: 2, .. })
        ));
        assert!(matches!(
            parse_http_args(&["ftp://h/"]),
            Err(OptionError::Url(_))
        ));
        assert!(matches!(
            parse_http_args::<&str>(&[]),
            Err(OptionError::MissingUrl)
        ));
    }

    #[test]
    fn messages_are_readable() {
        let e = parse_socket_args(&["h", "1", "fromat=td"]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "argument 3: unknown option \"fromat\" (known options: columns, delivery, exclude, format, framing, key, unchanged)"
        );
    }
}

/// Randomized inputs: hostile trigger arguments must give an error value,
/// never a panic (which would surface as an internal error).
#[cfg(test)]
mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn arbitrary_arguments_never_panic(args in proptest::collection::vec(".{0,40}", 0..6)) {
            if let Ok(t) = parse_socket_args(&args) {
                prop_assert!(t.port >= 1);
                prop_assert!(check_host(&t.host).is_ok());
            }
        }

        #[test]
        fn option_like_arguments_never_panic(
            opts in proptest::collection::vec("(delivery|format|framing|x)?=?[a-zA-Z= ]{0,10}", 0..5)
        ) {
            let _ = parse_options(&opts, 3, Kind::Socket);
            let _ = parse_options(&opts, 2, Kind::Http);
        }

        #[test]
        fn hosts_never_panic(host in "\\PC{0,300}") {
            let _ = check_host(&host);
        }
    }

    #[test]
    fn megabyte_host_is_refused() {
        let host = "a".repeat(1 << 20);
        assert_eq!(check_host(&host), Err(OptionError::HostTooLong(1 << 20)));
    }

    #[test]
    fn column_subsets_and_unchanged() {
        let o = parse_options(&["columns=id, total", "unchanged=skip"], 3, Kind::Socket).unwrap();
        assert_eq!(o.columns, Columns::Only(vec!["id".into(), "total".into()]));
        assert_eq!(o.unchanged, Unchanged::Skip);
        let o = parse_options(&["exclude=Secret"], 2, Kind::Destination).unwrap();
        assert_eq!(o.columns, Columns::Except(vec!["Secret".into()]));
        assert_eq!(Options::default().unchanged, Unchanged::Send);
        assert_eq!(
            parse_options(&["columns=a", "exclude=b"], 2, Kind::Http),
            Err(OptionError::ColumnsAndExclude { pos: 3 })
        );
        assert_eq!(
            parse_options(&["columns=a", "columns=b"], 2, Kind::Http),
            Err(OptionError::Duplicate {
                pos: 3,
                key: "columns"
            })
        );
        for bad in ["columns=", "columns=a,,b", "exclude=a,a", "unchanged=maybe"] {
            assert!(
                matches!(
                    parse_options(&[bad], 2, Kind::Http),
                    Err(OptionError::BadValue { pos: 2, .. })
                ),
                "{bad}"
            );
        }
    }
}
