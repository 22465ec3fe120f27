//! Where events go: one [`Destination`] type for every delivery mode, from
//! a URL (`tcp://host:port?framing=ndjson`, `http(s)://...`), from
//! `row_to_socket`/`row_to_http` arguments, or from a stored destination
//! (a name the DBA manages with `emit.create_destination`, whose options
//! are [`StoredOptions`]).

use crate::http_target;
use crate::options::{self, Format, Framing, OptionError};
use crate::route;
use crate::schedule::{Flow, Order, DEFAULT_CONCURRENCY};
use crate::sink::{AnyBroker, Settings};
use crate::transport::{host_port, http};
use serde::Deserialize;
use std::collections::BTreeMap;

/// A destination, resolved to what the network layer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    Tcp {
        host: String,
        port: u16,
        framing: Framing,
    },
    Http {
        url: String,
        headers: Vec<(String, String)>,
    },
    /// A broker's stream, subject or topic (`redis://host:port/stream`,
    /// `nats://host:port/subject`, `kafka://host:port/topic`: see
    /// [`crate::sink`]).
    Broker(AnyBroker),
    /// A broker URL that routes by table (`kafka://h/cdc.{schema}.{table}`,
    /// see [`crate::route`]): each row trigger fills it in, so events are
    /// only ever sent to (and queued for) the filled-in destination.
    /// `options` are a stored destination's, to configure each filled-in
    /// broker with.
    Routed {
        template: String,
        options: Option<String>,
    },
    /// A live channel (`channel:name`): kept in the database for
    /// `pg_emit.channel_retention` and pushed to WebSocket and SSE
    /// subscribers by the listener (see [`crate::live`]).
    Channel(String),
    /// A stored destination, as it was when the event was made. Async
    /// events keep only the name: the worker reads the destination when
    /// it delivers, so credentials never enter the outbox and a changed
    /// URL applies to what is still queued.
    Stored {
        name: String,
        endpoint: Box<Destination>,
        /// How its HTTP requests are signed (sync and commit; the worker
        /// reads the destination itself).
        signing: SignWith,
        /// HTTPS: its `ca_file` and client certificate.
        tls: crate::transport::tls::Options,
    },
}

impl Destination {
    /// For messages: `host:port`, the URL, or the stored name.
    pub fn name(&self) -> String {
        match self {
            Destination::Tcp { host, port, .. } => host_port(host, *port),
            Destination::Http { url, .. } => url.clone(),
            Destination::Broker(b) => b.url(),
            Destination::Routed { template, .. } => template.clone(),
            Destination::Channel(name) => format!("channel:{name}"),
            Destination::Stored { name, .. } => name.clone(),
        }
    }

    /// The destination of a row of `schema`.`table` when this one routes
    /// by table (`None` when it does not): the filled-in URL, or for a
    /// stored destination its name with the table (see [`crate::route`]).
    pub fn routed(&self, schema: &str, table: &str) -> Result<Option<Destination>, OptionError> {
        // `.` and `..` would be path segments the URL resolves away.
        if [schema, table].iter().any(|n| matches!(*n, "." | "..")) {
            return Err(OptionError::Destination(format!(
                "{:?}: a schema or table named . or .. cannot name a stream, subject or topic",
                self.name()
            )));
        }
        let fill = |template: &str, options: &Option<String>| match options {
            None => parse_url(&route::fill(template, schema, table), Vec::new())
                .map(|d| (d, SignWith::default(), Default::default())),
            Some(o) => parse_stored(&route::fill(template, schema, table), o)
                .map(|s| (s.endpoint, s.signing, s.tls)),
        };
        match self {
            Destination::Routed { template, options } => fill(template, options).map(|d| Some(d.0)),
            Destination::Stored { name, endpoint, .. } => match endpoint.as_ref() {
                Destination::Routed { template, options } => {
                    let (endpoint, signing, tls) = fill(template, options)?;
                    Ok(Some(Destination::Stored {
                        name: route::key(name, schema, table),
                        endpoint: Box::new(endpoint),
                        signing,
                        tls,
                    }))
                }
                _ => Ok(None),
            },
            _ => Ok(None),
        }
    }

    /// Where bytes actually go.
    pub fn endpoint(&self) -> &Destination {
        match self {
            Destination::Stored { endpoint, .. } => endpoint,
            d => d,
        }
    }

    /// Whether its sends use events' ordering keys (see
    /// [`crate::sink::Broker::KEYED`]).
    pub fn keyed(&self) -> bool {
        matches!(self.endpoint(), Destination::Broker(b) if b.keyed())
    }

    /// Whether its events carry their key as text (see
    /// [`crate::sink::Broker::record_keys`]).
    pub fn record_keys(&self) -> bool {
        matches!(self.endpoint(), Destination::Broker(b) if b.record_keys())
    }

    /// Whether messages can share a write (kept-open ndjson connections).
    pub fn coalesces(&self) -> bool {
        matches!(
            self.endpoint(),
            Destination::Tcp {
                framing: Framing::Ndjson,
                ..
            }
        )
    }

    /// The destination key of `emit.outbox` and `emit.stats`: a URL, or a
    /// stored destination's name. Headers are not shown (they may hold
    /// credentials), only told apart by a stable hash of them.
    pub fn key(&self) -> String {
        match self {
            Destination::Tcp {
                framing: Framing::Close,
                ..
            } => format!("tcp://{}", self.name()),
            Destination::Tcp {
                framing: Framing::Ndjson,
                ..
            } => format!("tcp://{}?framing=ndjson", self.name()),
            Destination::Http { url, headers } if headers.is_empty() => url.clone(),
            Destination::Http { url, headers } => {
                format!("{url} (headers {:08x})", fnv1a(headers) as u32)
            }
            Destination::Broker(b) => b.url(),
            Destination::Routed { template, .. } => template.clone(),
            Destination::Channel(name) => format!("channel:{name}"),
            Destination::Stored { name, .. } => name.clone(),
        }
    }

    /// `host`, `port`, `framing`, `url` and `headers` of `emit.outbox`:
    /// how the worker reaches the destination (`framing` is `stored` for a
    /// stored destination, which the worker looks up by its key). Headers
    /// are one "Name: value" per line.
    pub fn outbox_columns(&self) -> (String, i32, String, Option<String>, Option<String>) {
        match self {
            Destination::Tcp {
                host,
                port,
                framing,
            } => (
                host.clone(),
                i32::from(*port),
                framing.to_string(),
                None,
                None,
            ),
            Destination::Http { url, headers } => {
                let u = http_target::parse_url(url).ok();
                let lines: String = headers.iter().map(|(k, v)| format!("{k}: {v}\n")).collect();
                (
                    u.as_ref().map(|u| u.host.clone()).unwrap_or_default(),
                    u.map_or(0, |u| i32::from(u.port)),
                    "http".to_string(),
                    Some(url.clone()),
                    (!lines.is_empty()).then_some(lines),
                )
            }
            // Only URLs without credentials get here (those are stored).
            Destination::Broker(b) => {
                let (host, port) = b.address();
                (
                    host.to_string(),
                    i32::from(port),
                    b.scheme().into(),
                    Some(b.url()),
                    None,
                )
            }
            Destination::Channel(name) => (
                String::new(),
                0,
                "channel".into(),
                Some(format!("channel:{name}")),
                None,
            ),
            Destination::Stored { .. } => (String::new(), 0, "stored".into(), None, None),
            // Never queued: triggers fill it in first (a sender that
            // cannot is refused before anything is written).
            Destination::Routed { template, .. } => (
                String::new(),
                0,
                "routed".into(),
                Some(template.clone()),
                None,
            ),
        }
    }
}

/// FNV-1a over the headers: a hash whose value Rust's standard library
/// does not reserve the right to change between releases (`DefaultHasher`
/// does), so outbox keys stay the same across upgrades.
fn fnv1a(headers: &[(String, String)]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in headers {
        for b in k.bytes().chain([0]).chain(v.bytes()).chain([0]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

/// Whether `dest` (a destination argument) is a URL rather than the name
/// of a stored destination: names cannot contain `:`.
pub fn is_url(dest: &str) -> bool {
    dest.contains(':')
}

/// Parses a destination URL: `tcp://host:port[?framing=close|ndjson]`,
/// `http://...` or `https://...`; `headers` go with HTTP.
pub fn parse_url(input: &str, headers: Vec<(String, String)>) -> Result<Destination, OptionError> {
    if let Some(name) = input.strip_prefix("channel:") {
        if !headers.is_empty() {
            return Err(OptionError::Destination(format!(
                "{input:?}: headers apply to http:// and https:// destinations only"
            )));
        }
        check_channel(name)?;
        return Ok(Destination::Channel(name.to_string()));
    }
    let scheme = input.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    if route::is_template(input) {
        return parse_template(input, scheme.as_deref(), &headers);
    }
    match scheme.as_deref() {
        Some("http" | "https") => {
            let u = http_target::parse_url(input)?;
            Ok(Destination::Http {
                url: u.url,
                headers,
            })
        }
        Some(scheme) if scheme == "tcp" || AnyBroker::is_scheme(scheme) => {
            if !headers.is_empty() {
                return Err(OptionError::Destination(format!(
                    "{input:?}: headers apply to http:// and https:// destinations only"
                )));
            }
            match scheme {
                "tcp" => parse_tcp(input),
                _ => parse_broker(scheme, input),
            }
        }
        _ => Err(OptionError::Destination(format!(
            "{input:?} is neither a destination URL (tcp://host:port, http://..., https://..., \
             redis://host:port/stream, nats://host:port/subject, kafka://host:port/topic, \
             channel:name) nor the name of a stored destination"
        ))),
    }
}

/// A URL that routes by table: a broker's, with `{schema}` and `{table}`
/// only where its stream, subject or topic is, and well-formed when filled
/// in.
fn parse_template(
    input: &str,
    scheme: Option<&str>,
    headers: &[(String, String)],
) -> Result<Destination, OptionError> {
    let bad = |why: &str| OptionError::Destination(format!("{input:?}: {why}"));
    if !scheme.is_some_and(AnyBroker::is_scheme) || !headers.is_empty() {
        return Err(bad(
            "{schema} and {table} route a broker's stream, subject or topic \
             (redis://, nats://, kafka://)",
        ));
    }
    let rest = input.split_once("://").map_or("", |(_, r)| r);
    let authority = &rest[..rest.find('/').unwrap_or(rest.len())];
    if route::is_template(authority) {
        return Err(bad("{schema} and {table} go in the path, not the server"));
    }
    match parse_url(&route::fill(input, "schema", "table"), Vec::new())? {
        Destination::Broker(_) => Ok(Destination::Routed {
            template: input.to_string(),
            options: None,
        }),
        _ => Err(bad("not a broker URL")),
    }
}

/// A channel's name: it is a path segment of the listener's URLs
/// (`/channels/<name>`), so only characters that need no escaping there.
pub fn check_channel(name: &str) -> Result<(), OptionError> {
    let ok = (1..=63).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
        && name != "."
        && name != "..";
    if ok {
        Ok(())
    } else {
        Err(OptionError::Destination(format!(
            "channel name {name:?} must be 1 to 63 letters, digits, _, . and - \
             (it is a path segment of /channels/<name>)"
        )))
    }
}

fn parse_tcp(input: &str) -> Result<Destination, OptionError> {
    let bad = |why: &str| OptionError::Destination(format!("{input:?}: {why}"));
    if input.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad("a URL cannot contain whitespace or control characters"));
    }
    let u = url::Url::parse(input).map_err(|e| bad(&e.to_string()))?;
    if !u.username().is_empty() || u.password().is_some() {
        return Err(bad("tcp:// URLs carry no credentials"));
    }
    if !matches!(u.path(), "" | "/") || u.fragment().is_some() {
        return Err(bad(
            "a tcp:// URL is tcp://host:port[?framing=close|ndjson]",
        ));
    }
    let host = u.host_str().unwrap_or_default();
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    options::check_host(host)?;
    let port = u.port().ok_or_else(|| bad("the port is missing"))?;
    options::check_port(i32::from(port))?;
    let mut framing = Framing::Close;
    for (k, v) in u.query_pairs() {
        match (k.as_ref(), v.as_ref()) {
            ("framing", "close") => framing = Framing::Close,
            ("framing", "ndjson") => framing = Framing::Ndjson,
            _ => {
                return Err(bad(&format!(
                    "unknown parameter {k}={v} (known: framing=close|ndjson)"
                )))
            }
        }
    }
    Ok(Destination::Tcp {
        host: host.to_string(),
        port,
        framing,
    })
}

/// A broker's URL: its host checked, and no credentials, which belong in
/// a stored destination's options, never in a URL that a trigger would
/// show.
fn parse_broker(scheme: &str, input: &str) -> Result<Destination, OptionError> {
    let bad = |why: &str| OptionError::Destination(format!("{input:?}: {why}"));
    if input.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(bad("a URL cannot contain whitespace or control characters"));
    }
    // `scheme://h1:p1,h2:p2/...`: the URL of the first server, and the
    // rest (each checked as a host is).
    let (head, rest) = input.split_once("://").unwrap_or((input, ""));
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let mut servers = authority.split(',');
    let first = format!("{head}://{}{path}", servers.next().unwrap_or_default());
    let u = url::Url::parse(&first).map_err(|e| bad(&e.to_string()))?;
    let unbracket = |h: &str| {
        h.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(h)
            .to_string()
    };
    let host = unbracket(u.host_str().unwrap_or_default());
    options::check_host(&host)?;
    if let Some(p) = u.port() {
        options::check_port(i32::from(p))?;
    }
    let mut b = AnyBroker::parse(scheme, &u, host, input).expect("a broker's scheme")?;
    let more = servers
        .map(|s| {
            let u = url::Url::parse(&format!("{head}://{s}/"))
                .map_err(|e| bad(&format!("{s:?}: {e}")))?;
            if !u.username().is_empty() || u.password().is_some() {
                return Err(bad(
                    "credentials go in a stored destination's options, not in the URL",
                ));
            }
            let host = unbracket(u.host_str().unwrap_or_default());
            options::check_host(&host)?;
            if let Some(p) = u.port() {
                options::check_port(i32::from(p))?;
            }
            Ok((host, u.port()))
        })
        .collect::<Result<Vec<_>, OptionError>>()?;
    if !more.is_empty() {
        b.also(more).map_err(|why| bad(&why))?;
    }
    if !u.username().is_empty() || u.password().is_some() {
        let takes: Vec<_> = ["username", "password", "token"]
            .into_iter()
            .filter(|o| b.takes(o))
            .collect();
        return Err(bad(&match takes.is_empty() {
            true => format!("{scheme}:// destinations take no credentials"),
            false => format!(
                "credentials go in a stored destination's options ({}), not in the URL",
                takes.join(", ")
            ),
        }));
    }
    Ok(Destination::Broker(b))
}

/// A stored destination's name: an identifier-like word, so that it can
/// never be taken for a URL and reads well in `emit.stats` and logs.
pub fn check_name(name: &str) -> Result<(), OptionError> {
    let ok = name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(OptionError::Destination(format!(
            "destination name {name:?} must start with a letter or _ and contain only letters, \
             digits, _, . and - (at most 63)"
        )))
    }
}

/// The `options` of a stored destination. Unknown keys are refused, so a
/// typo is an error at `create_destination`, not a silent default. (No
/// `Debug`: it holds secrets.)
#[derive(Clone, PartialEq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoredOptions {
    /// HTTP request headers (credentials live here, not in triggers).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The event shape; a trigger's own `format=` wins.
    #[serde(default)]
    pub format: Option<StoredFormat>,
    /// `binary` or `structured` (the default): CloudEvents' HTTP content
    /// mode, with `format: cloudevents`.
    #[serde(default)]
    pub cloudevents: Option<StoredContentMode>,
    /// HTTP requests in flight at once (async delivery), 1 to
    /// [`http::MAX_CONCURRENCY`].
    #[serde(default)]
    pub concurrency: Option<usize>,
    /// `key` (default), `destination` or `none`: see [`Order`].
    #[serde(default)]
    pub order: Option<StoredOrder>,
    /// HTTP: up to this many events per request, as a JSON array (1 to
    /// [`MAX_BATCH`]; default 1, one event per request, the body the
    /// event itself).
    #[serde(default)]
    pub batch: Option<usize>,
    /// HTTP: most events per second (a receiver's rate limit).
    #[serde(default)]
    pub max_rate: Option<f64>,
    /// Standard Webhooks secrets, `whsec_<base64>`, space-separated.
    #[serde(default)]
    pub secret: Option<String>,
    /// `standard` (the default with a `secret`), `emit` (0.1.0's scheme
    /// with `pg_emit.signing_secret_file`, the default without) or `none`.
    #[serde(default)]
    pub signing: Option<StoredSigning>,
    /// Redis `AUTH` (a password, and a username for ACL users) or NATS
    /// user credentials.
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
    /// Redis: keep about this many newest entries (`XADD … MAXLEN ~`).
    #[serde(default)]
    pub maxlen: Option<u64>,
    /// NATS: an authentication token.
    #[serde(default)]
    pub token: Option<String>,
    /// NATS: an NKey user's seed (`SU…`).
    #[serde(default)]
    pub nkey_seed: Option<String>,
    /// NATS: the text of a `.creds` file (a JWT user of an operator).
    #[serde(default)]
    pub creds: Option<String>,
    /// NATS: the TLS handshake first (a server with `handshake_first`).
    #[serde(default)]
    pub tls_first: Option<bool>,
    /// TLS (brokers): CA certificates trusted instead of the system's, a
    /// client certificate and key, the name the server's certificate
    /// carries (see [`crate::transport::tls::Options`]).
    #[serde(default)]
    pub ca_file: Option<String>,
    #[serde(default)]
    pub cert_file: Option<String>,
    #[serde(default)]
    pub key_file: Option<String>,
    #[serde(default)]
    pub server_name: Option<String>,
    /// Kafka: `plaintext` (the default), `ssl`, `sasl_plaintext`,
    /// `sasl_ssl`; and `PLAIN` (the default), `SCRAM-SHA-256` or
    /// `SCRAM-SHA-512` with `username` and `password`.
    #[serde(default)]
    pub security_protocol: Option<String>,
    #[serde(default)]
    pub sasl_mechanism: Option<String>,
    /// Kafka: `none` (the default), `gzip`, `snappy`, `lz4`, `zstd`.
    #[serde(default)]
    pub compression: Option<String>,
    /// Kafka: the record key, `hash` (the ordering key's 16 hex digits,
    /// the default) or `columns` (a row's key columns as JSON).
    #[serde(default)]
    pub record_key: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoredSigning {
    Standard,
    Emit,
    None,
}

/// How a destination's HTTP requests are signed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum SignWith {
    /// 0.1.0's scheme, when `pg_emit.signing_secret_file` is set.
    #[default]
    FileKey,
    /// Standard Webhooks, with these secrets.
    Standard(Vec<Vec<u8>>),
    Nothing,
}

/// Most events in one HTTP request.
pub const MAX_BATCH: usize = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoredOrder {
    Key,
    Destination,
    None,
}

impl From<StoredOrder> for Order {
    fn from(o: StoredOrder) -> Self {
        match o {
            StoredOrder::Key => Order::Key,
            StoredOrder::Destination => Order::Destination,
            StoredOrder::None => Order::None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoredFormat {
    Json,
    Td,
    Supabase,
    Debezium,
    CloudEvents,
}

impl From<StoredFormat> for Format {
    fn from(f: StoredFormat) -> Self {
        match f {
            StoredFormat::Json => Format::Json,
            StoredFormat::Td => Format::Td,
            StoredFormat::Supabase => Format::Supabase,
            StoredFormat::Debezium => Format::Debezium,
            StoredFormat::CloudEvents => Format::CloudEvents,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoredContentMode {
    Binary,
    Structured,
}

/// A stored destination's URL and options, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Stored {
    pub endpoint: Destination,
    pub format: Option<Format>,
    /// How its events flow (HTTP; TCP is always [`Flow::SERIAL`]).
    pub flow: Flow,
    pub signing: SignWith,
    /// HTTPS: `ca_file`, `cert_file`, `key_file` and `server_name`
    /// (brokers keep theirs).
    pub tls: crate::transport::tls::Options,
}

/// The TLS options an `https://` destination takes.
const HTTPS_OPTIONS: [&str; 4] = ["ca_file", "cert_file", "key_file", "server_name"];

/// Checks a stored destination's `url` and `options` (JSON text).
pub fn parse_stored(url: &str, options: &str) -> Result<Stored, OptionError> {
    if route::is_template(url) {
        // The URL's form, then the options on a filled-in one: each
        // table's is configured the same way when a trigger fills it in.
        parse_url(url, Vec::new())?;
        let sample = parse_stored(&route::fill(url, "schema", "table"), options)?;
        return Ok(Stored {
            endpoint: Destination::Routed {
                template: url.to_string(),
                options: Some(options.to_string()),
            },
            ..sample
        });
    }
    let opts: StoredOptions = serde_json::from_str(options)
        .map_err(|e| OptionError::Destination(format!("options: {e}")))?;
    let headers = opts
        .headers
        .iter()
        .map(|(k, v)| {
            http_target::check_header(k, v)
                .map(|()| (k.clone(), v.clone()))
                .map_err(|_| {
                    OptionError::Destination(format!("options: header {k:?} cannot be set"))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let concurrency = opts.concurrency.unwrap_or(DEFAULT_CONCURRENCY);
    if !(1..=http::MAX_CONCURRENCY).contains(&concurrency) {
        return Err(OptionError::Destination(format!(
            "options: concurrency {concurrency} is not between 1 and {}",
            http::MAX_CONCURRENCY
        )));
    }
    let batch = opts.batch.unwrap_or(1);
    if !(1..=MAX_BATCH).contains(&batch) {
        return Err(OptionError::Destination(format!(
            "options: batch {batch} is not between 1 and {MAX_BATCH}"
        )));
    }
    if let Some(r) = opts.max_rate {
        if !(r.is_finite() && r > 0.0) {
            return Err(OptionError::Destination(format!(
                "options: max_rate {r} is not a positive number of events per second"
            )));
        }
    }
    let mut endpoint = parse_url(url, headers)?;
    if let Destination::Channel(name) = &endpoint {
        // Its events are numbered per destination key: a stored name and
        // channel:name would number the same channel twice.
        return Err(OptionError::Destination(format!(
            "a channel is not stored: name it as channel:{name} wherever a destination goes"
        )));
    }
    if opts.username.is_some() && opts.password.is_none() {
        return Err(OptionError::Destination(
            "options: username needs a password".into(),
        ));
    }
    // The options only some brokers take (see crate::sink::Broker::OPTIONS).
    let given = [
        ("username", opts.username.is_some()),
        ("password", opts.password.is_some()),
        ("token", opts.token.is_some()),
        ("nkey_seed", opts.nkey_seed.is_some()),
        ("creds", opts.creds.is_some()),
        ("tls_first", opts.tls_first.is_some()),
        ("maxlen", opts.maxlen.is_some()),
        ("ca_file", opts.ca_file.is_some()),
        ("cert_file", opts.cert_file.is_some()),
        ("key_file", opts.key_file.is_some()),
        ("server_name", opts.server_name.is_some()),
        ("security_protocol", opts.security_protocol.is_some()),
        ("sasl_mechanism", opts.sasl_mechanism.is_some()),
        ("compression", opts.compression.is_some()),
        ("record_key", opts.record_key.is_some()),
    ];
    let https = matches!(&endpoint, Destination::Http { url, .. } if url.starts_with("https://"));
    for (name, _) in given.iter().filter(|(_, set)| *set) {
        let taken = match &endpoint {
            Destination::Broker(b) => b.takes(name),
            _ => https && HTTPS_OPTIONS.contains(name),
        };
        if !taken {
            let mut schemes: Vec<_> = AnyBroker::taking(name)
                .into_iter()
                .map(|s| format!("{s}://"))
                .collect();
            if HTTPS_OPTIONS.contains(name) {
                schemes.push("https://".into());
            }
            return Err(OptionError::Destination(format!(
                "options: {name} applies to {} destinations only",
                schemes.join(", ")
            )));
        }
    }
    if let Destination::Broker(b) = &mut endpoint {
        b.configure(&Settings {
            username: opts.username.as_deref(),
            password: opts.password.as_deref(),
            token: opts.token.as_deref(),
            nkey_seed: opts.nkey_seed.as_deref(),
            creds: opts.creds.as_deref(),
            tls_first: opts.tls_first.unwrap_or(false),
            maxlen: opts.maxlen,
            security_protocol: opts.security_protocol.as_deref(),
            sasl_mechanism: opts.sasl_mechanism.as_deref(),
            compression: opts.compression.as_deref(),
            record_key: opts.record_key.as_deref(),
            tls: crate::transport::tls::Options {
                ca_file: opts.ca_file.clone(),
                cert_file: opts.cert_file.clone(),
                key_file: opts.key_file.clone(),
                server_name: opts.server_name.clone(),
            },
        })?;
    }
    let format = match (opts.format, opts.cloudevents) {
        (None, None) => None,
        (f, mode) => Some(
            Format::combine(
                None,
                mode.map(|m| m == StoredContentMode::Binary),
                f.map(Format::from),
                matches!(endpoint, Destination::Http { .. }),
            )
            .map_err(|e| OptionError::Destination(format!("options: {e}")))?,
        ),
    };
    if format == Some(Format::CloudEventsBinary) && batch > 1 {
        return Err(OptionError::Destination(
            "options: cloudevents \"binary\" sends one event per request; batch must be 1 \
             (structured mode batches as application/cloudevents-batch+json)"
                .into(),
        ));
    }
    let secrets = match &opts.secret {
        None => None,
        Some(_) if !matches!(endpoint, Destination::Http { .. }) => {
            return Err(OptionError::Destination(
                "options: secret signs HTTP requests; this destination is not http(s)://".into(),
            ))
        }
        Some(text) => Some(
            http::parse_secrets(text)
                .map_err(|e| OptionError::Destination(format!("options: {e}")))?,
        ),
    };
    let signing = match (opts.signing, secrets) {
        (Some(StoredSigning::Standard) | None, Some(s)) => SignWith::Standard(s),
        (Some(StoredSigning::Standard), None) => {
            return Err(OptionError::Destination(
                "options: signing \"standard\" needs a secret (whsec_...)".into(),
            ))
        }
        (Some(StoredSigning::Emit), None) | (None, None) => SignWith::FileKey,
        (Some(StoredSigning::None), None) => SignWith::Nothing,
        (Some(other), Some(_)) => {
            return Err(OptionError::Destination(format!(
                "options: a secret is for signing \"standard\", not {other:?}"
            )))
        }
    };
    let tls = crate::transport::tls::Options {
        ca_file: opts.ca_file.filter(|_| https),
        cert_file: opts.cert_file.filter(|_| https),
        key_file: opts.key_file.filter(|_| https),
        server_name: opts.server_name.filter(|_| https),
    };
    tls.check()
        .map_err(|e| OptionError::Destination(format!("options: {e}")))?;
    Ok(Stored {
        signing,
        endpoint,
        format,
        tls,
        flow: Flow {
            concurrency,
            order: opts.order.map_or(Order::Key, Order::from),
            batch,
            max_rate: opts.max_rate,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_urls() {
        let d = parse_url("redis://127.0.0.1:6380/orders%20v2?maxlen=1000", Vec::new()).unwrap();
        let Destination::Broker(AnyBroker::Redis(s)) = &d else {
            panic!("{d:?}")
        };
        assert_eq!(
            (s.host.as_str(), s.port, s.key.as_str(), s.maxlen),
            ("127.0.0.1", 6380, "orders v2", Some(1000))
        );
        assert_eq!(d.key(), "redis://127.0.0.1:6380/orders%20v2?maxlen=1000");
        // The key round-trips through the outbox's url column.
        assert_eq!(parse_url(&d.key(), Vec::new()).unwrap(), d);
        let plus = parse_url("redis://h/a+b", Vec::new()).unwrap();
        assert!(
            matches!(plus, Destination::Broker(AnyBroker::Redis(ref s)) if s.key == "a+b" && s.port == 6379)
        );
        for bad in [
            "redis://u:p@h/s",
            "redis://h/",
            "redis://h:1/s?maxlen=0",
            "redis://h:1/s?db=2",
            "redis://h:1/%ff",
        ] {
            assert!(parse_url(bad, Vec::new()).is_err(), "{bad}");
        }
        let e = parse_url("redis://u:p@h/s", Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("stored destination's options"), "{e}");
    }

    #[test]
    fn kafka_urls() {
        let d = parse_url("kafka://127.0.0.1:19092/orders.v2", Vec::new()).unwrap();
        let Destination::Broker(AnyBroker::Kafka(t)) = &d else {
            panic!("{d:?}")
        };
        assert_eq!(
            (t.host.as_str(), t.port, t.topic.as_str()),
            ("127.0.0.1", 19092, "orders.v2")
        );
        assert_eq!(parse_url(&d.key(), Vec::new()).unwrap(), d);
        assert!(matches!(
            parse_url("kafka://h/t", Vec::new()).unwrap(),
            Destination::Broker(AnyBroker::Kafka(ref t)) if t.port == 9092
        ));
        for bad in [
            "kafka://h/",
            "kafka://h/a/b",
            "kafka://h/t?acks=1",
            "kafka://h/a%20b",
        ] {
            assert!(parse_url(bad, Vec::new()).is_err(), "{bad}");
        }
        let e = parse_url("kafka://u:p@h/t", Vec::new())
            .unwrap_err()
            .to_string();
        assert!(e.contains("options (username, password)"), "{e}");
        for (options, why) in [
            (r#"{"username":"u","password":"p"}"#, "are for SASL"),
            (
                r#"{"security_protocol":"sasl_ssl"}"#,
                "needs a username and password",
            ),
            (
                r#"{"security_protocol":"ssl","sasl_mechanism":"PLAIN"}"#,
                "are for SASL",
            ),
            (
                r#"{"security_protocol":"sasl_plaintext","username":"u","password":"p","sasl_mechanism":"GSSAPI"}"#,
                "is not PLAIN",
            ),
            (
                r#"{"security_protocol":"sasl_plaintext","ca_file":"/ca.pem","username":"u","password":"p"}"#,
                "are for TLS",
            ),
            (r#"{"security_protocol":"tls"}"#, "is not plaintext, ssl"),
        ] {
            let e = parse_stored("kafka://h/t", options)
                .unwrap_err()
                .to_string();
            assert!(e.contains(why), "{options}: {e}");
        }
        let s = parse_stored(
            "kafka://h/t",
            r#"{"security_protocol":"SASL_SSL","sasl_mechanism":"SCRAM-SHA-512","username":"u","password":"p","ca_file":"/ca.pem"}"#,
        )
        .unwrap();
        let Destination::Broker(AnyBroker::Kafka(k)) = s.endpoint else {
            panic!("{s:?}")
        };
        assert_eq!(
            k.sasl.unwrap().mechanism,
            crate::sasl::Mechanism::ScramSha512
        );
        assert_eq!(k.tls.unwrap().ca_file.as_deref(), Some("/ca.pem"));
    }

    #[test]
    fn rediss_is_redis_over_tls() {
        let d = parse_url("rediss://h:6380/orders", Vec::new()).unwrap();
        assert_eq!(d.key(), "rediss://h:6380/orders");
        assert_eq!(d.outbox_columns().2, "rediss");
        let s = parse_stored(
            "rediss://h/orders",
            r#"{"ca_file":"/etc/ca.pem","cert_file":"/c.pem","key_file":"/k.pem","server_name":"redis.internal"}"#,
        )
        .unwrap();
        let Destination::Broker(AnyBroker::Redis(r)) = s.endpoint else {
            panic!("{s:?}")
        };
        let t = r.tls.unwrap();
        assert_eq!(t.ca_file.as_deref(), Some("/etc/ca.pem"));
        assert_eq!(t.server_name.as_deref(), Some("redis.internal"));
        for (url, options, why) in [
            (
                "redis://h/s",
                r#"{"ca_file":"/ca.pem"}"#,
                "use a rediss:// URL",
            ),
            (
                "rediss://h/s",
                r#"{"cert_file":"/c.pem"}"#,
                "cert_file and key_file go together",
            ),
            (
                "rediss://h/s",
                r#"{"server_name":"a b"}"#,
                "not a host name",
            ),
            (
                "tcp://h:1",
                r#"{"ca_file":"/ca.pem"}"#,
                "ca_file applies to",
            ),
        ] {
            let e = parse_stored(url, options).unwrap_err().to_string();
            assert!(e.contains(why), "{url} {options}: {e}");
        }
    }

    #[test]
    fn kafka_takes_several_bootstrap_brokers() {
        let d = parse_url("kafka://h1:9093,h2,[::1]:9094/orders", Vec::new()).unwrap();
        assert_eq!(d.key(), "kafka://h1:9093,h2:9092,[::1]:9094/orders");
        let Destination::Broker(AnyBroker::Kafka(k)) = &d else {
            panic!("{d:?}")
        };
        assert_eq!(k.more, [("h2".into(), 9092), ("::1".into(), 9094)]);
        assert_eq!(parse_url(&d.key(), Vec::new()).unwrap(), d);
        for (bad, why) in [
            ("redis://h1,h2/s", "name one server"),
            ("kafka://h1,/t", "must not be empty"),
            ("kafka://h1,h 2/t", "whitespace"),
            ("kafka://h1,u:p@h2/t", "credentials go in"),
            ("kafka://h1,h2:0/t", "port"),
            ("kafka://h1:0/t", "port"),
        ] {
            let e = parse_url(bad, Vec::new()).unwrap_err().to_string();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }

    #[test]
    fn templates_route_by_table() {
        let d = parse_url("kafka://h:9092/cdc.{schema}.{table}", Vec::new()).unwrap();
        assert!(matches!(d, Destination::Routed { .. }));
        let r = d.routed("public", "orders").unwrap().unwrap();
        assert_eq!(r.key(), "kafka://h:9092/cdc.public.orders");
        assert!(parse_url("kafka://h/cdc.x", Vec::new())
            .unwrap()
            .routed("public", "orders")
            .unwrap()
            .is_none());
        // A stored one: its name with the table, its options on each.
        let s = parse_stored(
            "redis://h/{schema}.{table}",
            r#"{"password":"pw","maxlen":5}"#,
        )
        .unwrap();
        let stored = Destination::Stored {
            name: "cdc".into(),
            endpoint: Box::new(s.endpoint),
            signing: s.signing,
            tls: s.tls,
        };
        let r = stored.routed("a.b", "t").unwrap().unwrap();
        assert_eq!(r.key(), "cdc@a%2Eb.t");
        let Destination::Broker(AnyBroker::Redis(st)) = r.endpoint() else {
            panic!("{r:?}")
        };
        assert_eq!((st.key.as_str(), st.maxlen), ("a.b.t", Some(5)));
        assert!(st.auth.is_some());
        // Names a broker cannot take.
        let k = parse_url("kafka://h/cdc.{table}", Vec::new()).unwrap();
        assert!(k.routed("public", "order items").is_err());
    }

    #[test]
    fn tls_is_nats_over_tls() {
        let d = parse_url("tls://h/orders.new", Vec::new()).unwrap();
        assert_eq!(d.key(), "tls://h:4222/orders.new");
        assert_eq!(d.outbox_columns().2, "tls");
        let s = parse_stored("nats://h/a", r#"{"ca_file":"/ca.pem"}"#).unwrap();
        let Destination::Broker(AnyBroker::Nats(n)) = s.endpoint else {
            panic!("{s:?}")
        };
        assert!(!n.tls_url);
        assert_eq!(n.tls.ca_file.as_deref(), Some("/ca.pem"));
    }

    #[test]
    fn redis_stored_options() {
        let s = parse_stored(
            "redis://127.0.0.1/s",
            r#"{"password":"pw","username":"app","maxlen":50,"format":"debezium"}"#,
        )
        .unwrap();
        let Destination::Broker(AnyBroker::Redis(r)) = &s.endpoint else {
            panic!()
        };
        assert_eq!(r.maxlen, Some(50));
        assert_eq!(r.auth.as_ref().map(|a| a.password.as_str()), Some("pw"));
        assert_eq!(s.format, Some(Format::Debezium));
        assert!(
            !s.endpoint.key().contains("pw"),
            "credentials never in the key"
        );
        for (url, opts, why) in [
            ("redis://h/s", r#"{"username":"u"}"#, "needs a password"),
            (
                "tcp://h:1",
                r#"{"password":"p"}"#,
                "redis://, nats://, kafka:// destinations only",
            ),
            ("tcp://h:1", r#"{"maxlen":3}"#, "redis:// destinations only"),
            ("nats://h/a", r#"{"password":"p"}"#, "needs its username"),
            (
                "nats://h/a",
                r#"{"token":"t","username":"u","password":"p"}"#,
                "give one of",
            ),
            ("redis://h/s", r#"{"headers":{"A":"b"}}"#, "headers apply"),
            (
                "redis://h/s",
                r#"{"secret":"whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"}"#,
                "not http",
            ),
            (
                "redis://h/s",
                r#"{"format":"cloudevents","cloudevents":"binary"}"#,
                "not http",
            ),
        ] {
            let e = parse_stored(url, opts).unwrap_err().to_string();
            assert!(e.contains(why), "{url} {opts}: {e}");
        }
    }

    #[test]
    fn tcp_urls() {
        assert_eq!(
            parse_url("tcp://127.0.0.1:26200", vec![]).unwrap(),
            Destination::Tcp {
                host: "127.0.0.1".into(),
                port: 26200,
                framing: Framing::Close
            }
        );
        let d = parse_url("tcp://[::1]:9?framing=ndjson", vec![]).unwrap();
        assert_eq!(d.key(), "tcp://[::1]:9?framing=ndjson");
        assert!(d.coalesces());
        for bad in [
            "tcp://127.0.0.1",
            "tcp://127.0.0.1:0",
            "tcp://127.0.0.1:70000",
            "tcp://h:1/path",
            "tcp://u:p@h:1",
            "tcp://h:1?framing=xml",
            "tcp://h:1?x=1",
            "tcp://h :1",
            "ftp://h:1",
            "orders",
        ] {
            assert!(parse_url(bad, vec![]).is_err(), "{bad}");
        }
    }

    #[test]
    fn http_urls_are_normalised_and_keep_headers() {
        let h = vec![("Authorization".to_string(), "Bearer x".to_string())];
        let d = parse_url("HTTP://Example.com:80/a", h).unwrap();
        assert_eq!(d.name(), "http://example.com/a");
        // The key hides the headers' values, and is stable across builds.
        assert_eq!(d.key(), "http://example.com/a (headers 595907c5)");
    }

    #[test]
    fn channels() {
        let d = parse_url("channel:orders.eu-1", Vec::new()).unwrap();
        assert_eq!(d, Destination::Channel("orders.eu-1".into()));
        assert_eq!(d.key(), "channel:orders.eu-1");
        assert!(is_url("channel:orders"));
        for bad in [
            "channel:",
            "channel:a/b",
            "channel:..",
            "channel:a b",
            "channel:%41",
        ] {
            assert!(parse_url(bad, Vec::new()).is_err(), "{bad}");
        }
        assert!(parse_url(&format!("channel:{}", "a".repeat(64)), Vec::new()).is_err());
        let e = parse_stored("channel:orders", "{}").unwrap_err();
        assert!(e.to_string().contains("not stored"), "{e}");
    }

    #[test]
    fn names() {
        for ok in ["orders", "_x", "a.b-c_9"] {
            assert!(check_name(ok).is_ok(), "{ok}");
            assert!(!is_url(ok));
        }
        for bad in ["", "9a", "a b", "a:b", "tcp://x:1", &"a".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn stored_options_are_typed_and_strict() {
        let s = parse_stored(
            "https://hooks.example/x",
            r#"{"headers":{"Authorization":"Bearer s3cret"},"format":"td"}"#,
        )
        .unwrap();
        assert_eq!(s.format, Some(Format::Td));
        assert!(matches!(s.endpoint, Destination::Http { ref headers, .. } if headers.len() == 1));
        let e = parse_stored("https://h/x", r#"{"header":{}}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `header`"), "{e}");
        let e = parse_stored("https://h/x", r#"{"format":"xml"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant `xml`"), "{e}");
        let e = parse_stored("https://h/x", r#"{"headers":{"Host":"evil"}}"#).unwrap_err();
        assert!(e.to_string().contains("\"Host\" cannot be set"), "{e}");
        assert!(parse_stored("tcp://h:1", r#"{"headers":{"A":"b"}}"#).is_err());
        assert!(parse_stored("tcp://h:1", "{}").is_ok());
        let s = parse_stored("https://h/x", r#"{"concurrency":64,"order":"none"}"#).unwrap();
        assert_eq!((s.flow.concurrency, s.flow.order), (64, Order::None));
        assert_eq!(parse_stored("https://h/x", "{}").unwrap().flow, Flow::HTTP);
        let s = parse_stored("https://h/x", r#"{"batch":100,"max_rate":5.5}"#).unwrap();
        assert_eq!((s.flow.batch, s.flow.max_rate), (100, Some(5.5)));
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let s = parse_stored(
            "https://h/x",
            &format!(r#"{{"secret":"{secret} {secret}"}}"#),
        )
        .unwrap();
        assert!(matches!(s.signing, SignWith::Standard(ref k) if k.len() == 2));
        assert_eq!(
            parse_stored("https://h/x", "{}").unwrap().signing,
            SignWith::FileKey
        );
        assert_eq!(
            parse_stored("https://h/x", r#"{"signing":"none"}"#)
                .unwrap()
                .signing,
            SignWith::Nothing
        );
        for bad in [
            r#"{"secret":"nope"}"#,
            r#"{"signing":"standard"}"#,
            r#"{"signing":"emit","secret":"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"}"#,
        ] {
            assert!(parse_stored("https://h/x", bad).is_err(), "{bad}");
        }
        assert!(parse_stored("tcp://h:1", &format!(r#"{{"secret":"{secret}"}}"#)).is_err());
        for bad in [
            r#"{"concurrency":0}"#,
            r#"{"concurrency":5000}"#,
            r#"{"order":"fifo"}"#,
            r#"{"batch":0}"#,
            r#"{"batch":1001}"#,
            r#"{"max_rate":0}"#,
            r#"{"max_rate":-5}"#,
        ] {
            assert!(parse_stored("https://h/x", bad).is_err(), "{bad}");
        }
    }
}
