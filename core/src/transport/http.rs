//! HTTP(S) with ureq: validation, signing, and a client whose every
//! request is bounded, cancellable and checked against the allowlist.
//!
//! ureq is blocking, so a request runs on a helper thread while the caller
//! waits in slices that honour cancellation ([`request_interruptible`]). The
//! client resolves names itself ([`GuardedResolver`]) so the allowlist sees
//! the addresses that will really be connected to, and it never follows
//! redirects: a redirect could lead outside the allowed destinations, so a
//! 3xx is reported as what it is.

use super::{Cancelled, Interrupt, SLICE};
use crate::http_target::{parse_url, quote};
use crate::security::Allowlist;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::io::Read;
use std::sync::{mpsc, Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use ureq::config::Config;
use ureq::http::Uri;
use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::time as ureq_time;
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, Either, LazyBuffers, NextTimeout, TcpConnector,
    Transport, TransportAdapter,
};

/// Longest response body excerpt kept for error messages and dead letters.
pub const EXCERPT_BYTES: usize = 512;

/// Response bodies are read to the end (up to this) so the keep-alive
/// connection can be reused; a longer body just closes the connection.
const DRAIN_BYTES: u64 = 64 * 1024;

/// `X-Emit-Signature` value for `body` at `timestamp` (Unix seconds):
/// `v1=` + hex HMAC-SHA256 over `"<timestamp>.<body>"`. Binding the
/// timestamp into the MAC lets receivers reject replays of old requests.
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    let mut out = String::with_capacity(3 + 64);
    out.push_str("v1=");
    for b in tag {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// How a request is signed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Signing {
    #[default]
    None,
    /// 0.1.0's scheme (`X-Emit-Timestamp`, `X-Emit-Signature`) with the
    /// key of `pg_emit.signing_secret_file`.
    Emit(Vec<u8>),
    /// Standard Webhooks v1: `webhook-id` (`id`, the same on every retry),
    /// `webhook-timestamp`, and one `v1,` signature per secret, so that a
    /// receiver rotating its secret verifies with either.
    Standard { id: String, secrets: Vec<Vec<u8>> },
}

/// A Standard Webhooks signature: `v1,` + base64 of HMAC-SHA256(secret,
/// `"<id>.<timestamp>.<body>"`).
pub fn standard_signature(secret: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    use base64::Engine as _;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let tag = mac.finalize().into_bytes();
    format!(
        "v1,{}",
        base64::engine::general_purpose::STANDARD.encode(tag)
    )
}

/// Standard Webhooks secrets, `whsec_<base64>`, several separated by
/// spaces (the new one and the old one, while receivers rotate).
pub fn parse_secrets(text: &str) -> Result<Vec<Vec<u8>>, String> {
    use base64::Engine as _;
    let secrets: Vec<Vec<u8>> = text
        .split_whitespace()
        .map(|s| {
            let b64 = s.strip_prefix("whsec_").ok_or(
                "a secret is whsec_ followed by base64 (as Standard Webhooks libraries write it)",
            )?;
            let key = base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map_err(|_| "a secret's part after whsec_ is not valid base64")?;
            if !(24..=64).contains(&key.len()) {
                return Err("a secret must decode to 24 to 64 bytes (Standard Webhooks' range)");
            }
            Ok(key)
        })
        .collect::<Result<_, &str>>()?;
    if secrets.is_empty() {
        return Err("secret is empty".into());
    }
    Ok(secrets)
}

/// Where trust comes from for HTTPS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trust {
    /// The operating system's store, as a DBA configures it.
    System,
    /// PEM CA certificates (`pg_emit.ca_file`), instead of the system store.
    Pem(Vec<u8>),
}

/// Everything a client is built from; a change in any of it means a new
/// client (and new connections).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientConfig {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
    pub trust: Trust,
    pub allow: Allowlist,
    /// A stored destination's own `ca_file` (instead of `trust`), client
    /// certificate (`cert_file`, `key_file`) and `server_name`.
    pub tls: super::tls::Options,
}

/// Most requests a destination may have in flight at once.
pub const MAX_CONCURRENCY: usize = 1024;

/// A keep-alive HTTP client.
#[derive(Debug, Clone)]
pub struct Client {
    agent: ureq::Agent,
    pub config: ClientConfig,
}

/// Resolves with the system resolver and keeps only the addresses the
/// allowlist accepts; ureq connects to what this returns, nothing else.
#[derive(Debug)]
struct GuardedResolver {
    allow: Allowlist,
    /// Bounds the lookup: ureq's own resolver knows no timeout but the
    /// request's, and a resolver that never answers must not hold a
    /// request past `pg_emit.connect_timeout`.
    connect_timeout: Duration,
}

/// The allowlist's refusal, carried through ureq's error type.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Refused(String);

impl Resolver for GuardedResolver {
    fn resolve(
        &self,
        uri: &Uri,
        _config: &Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let url = parse_url(&uri.to_string()).map_err(|e| ureq::Error::BadUri(e.to_string()))?;
        let budget = timeout
            .not_zero()
            .map_or(self.connect_timeout, |t| self.connect_timeout.min(*t));
        let found = super::tcp::resolve(
            &url.host,
            url.port,
            Instant::now() + budget,
            &super::Uninterruptible,
        )
        .map_err(|e| ureq::Error::Other(Box::new(std::io::Error::other(e.to_string()))))?;
        let ok = self
            .allow
            .filter(&url.host, url.port, Some(&url.url), &found)
            .map_err(|r| ureq::Error::Other(Box::new(Refused(r.0))))?;
        let mut out = self.empty();
        for a in ok.into_iter().take(16) {
            out.push(a);
        }
        Ok(out)
    }
}

impl Client {
    pub fn new(config: ClientConfig) -> Result<Client, String> {
        let tls = Https {
            options: config.tls.clone(),
            fallback: match &config.trust {
                Trust::System => None,
                Trust::Pem(pem) => Some(pem.clone()),
            },
            config: OnceLock::new(),
        };
        let agent_config = Config::builder()
            .http_status_as_error(false)
            .max_redirects(0)
            // Never a proxy from the server's environment (HTTP_PROXY and
            // friends): the allowlist would check the proxy's address, not
            // the destination's.
            .proxy(None)
            .timeout_connect(Some(config.connect_timeout))
            .timeout_global(Some(config.request_timeout))
            // The worker keeps up to a destination's `concurrency`
            // requests in flight: keep that many connections alive, not
            // ureq's default of three.
            .max_idle_connections(MAX_CONCURRENCY)
            .max_idle_connections_per_host(MAX_CONCURRENCY)
            // Servers close idle keep-alive connections (Node after 5 s):
            // one reused after that fails its request, which then counts
            // as a failed attempt. Give them up first.
            .max_idle_age(Duration::from_secs(4))
            .user_agent(concat!("pg_emit/", env!("CARGO_PKG_VERSION")))
            .build();
        let agent = ureq::Agent::with_parts(
            agent_config,
            ().chain(TcpConnector::default()).chain(tls),
            GuardedResolver {
                allow: config.allow.clone(),
                connect_timeout: config.connect_timeout,
            },
        );
        Ok(Client { agent, config })
    }
}

/// TLS for `https://`, made as the brokers' is ([`super::tls::Options`]):
/// the same trust, client certificates and `server_name`, and refusals in
/// the same words. ureq's own TLS checks the certificate against the URL's
/// host only.
struct Https {
    options: super::tls::Options,
    /// `pg_emit.ca_file`'s certificates, trusted when `ca_file` is not set.
    fallback: Option<Vec<u8>>,
    /// Made at the first `https://` connection, not before: a client for
    /// `http://` must not need a trust store (a container may have none).
    config: OnceLock<Result<Arc<rustls::ClientConfig>, String>>,
}

impl std::fmt::Debug for Https {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Https")
            .field("server_name", &self.options.server_name)
            .finish()
    }
}

/// A TLS failure, in [`super::tls::reason`]'s words.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct TlsFailed(String);

fn tls_failed(message: String) -> ureq::Error {
    ureq::Error::Other(Box::new(TlsFailed(message)))
}

/// An I/O error of the TLS stream: a TLS one in our words; anything else
/// (a timeout ureq carries inside, a reset) as ureq reads it.
fn tls_io(e: std::io::Error) -> ureq::Error {
    match e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
        Some(t) => tls_failed(super::tls::reason(t)),
        None => ureq::Error::from(e),
    }
}

impl<In: Transport> Connector<In> for Https {
    type Out = Either<In, HttpsTransport>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        let Some(transport) = chained else {
            return Ok(None);
        };
        if !details.needs_tls() || transport.is_tls() {
            return Ok(Some(Either::A(transport)));
        }
        let config = self
            .config
            .get_or_init(|| self.options.config_trusting(self.fallback.as_deref()))
            .clone()
            .map_err(tls_failed)?;
        let host = details.uri.host().unwrap_or_default();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        let name = self.options.name_for(host).map_err(tls_failed)?;
        let mut conn = rustls::ClientConnection::new(config, name)
            .map_err(|e| tls_failed(super::tls::reason(&e)))?;
        let mut sock = TransportAdapter::new(transport.boxed(), details.current_time.clone());
        // What is left of the connect budget, which the TCP connect
        // started using at `details.now` (ureq's own TLS counts from
        // there too).
        let mut timeout = details.timeout;
        if let (
            ureq_time::Duration::Exact(left),
            ureq_time::Instant::Exact(now),
            ureq_time::Instant::Exact(then),
        ) = (timeout.after, (details.current_time)(), details.now)
        {
            timeout.after = ureq_time::Duration::Exact(
                left.saturating_sub(now.saturating_duration_since(then)),
            );
        }
        sock.set_timeout(timeout);
        conn.complete_io(&mut sock).map_err(tls_io)?;
        let buffers = LazyBuffers::new(
            details.config.input_buffer_size(),
            details.config.output_buffer_size(),
        );
        Ok(Some(Either::B(HttpsTransport {
            buffers,
            stream: rustls::StreamOwned { conn, sock },
        })))
    }
}

/// A request's TLS connection.
struct HttpsTransport {
    buffers: LazyBuffers,
    stream: rustls::StreamOwned<rustls::ClientConnection, TransportAdapter>,
}

impl std::fmt::Debug for HttpsTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpsTransport")
    }
}

impl Transport for HttpsTransport {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        use std::io::Write;
        self.stream.get_mut().set_timeout(timeout);
        let output = &self.buffers.output()[..amount];
        self.stream.write_all(output).map_err(tls_io)
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        self.stream.get_mut().set_timeout(timeout);
        let input = self.buffers.input_append_buf();
        let amount = self.stream.read(input).map_err(tls_io)?;
        self.buffers.input_appended(amount);
        Ok(amount > 0)
    }

    fn is_open(&mut self) -> bool {
        self.stream.get_mut().get_mut().is_open()
    }

    fn is_tls(&self) -> bool {
        true
    }
}

/// A request, owned so it can move to a helper thread.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub url: String,
    pub content_type: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// The id of the event(s) the body carries, sent as `webhook-id` (the
    /// Standard Webhooks header, also when unsigned: a receiver's key for
    /// dropping a redelivery whatever the body's format).
    pub id: Option<String>,
    /// How to sign the request.
    pub signing: Signing,
}

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub excerpt: String,
    pub retry_after: Option<Duration>,
}

/// Why a request got no response. Like [`super::tcp::SendError`], it
/// never says where: the caller names the destination.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    NotAllowed(String),
    #[error("request timed out after {ms} ms (pg_emit.connect_timeout / pg_emit.http_timeout)")]
    Timeout { ms: u128 },
    #[error("request failed: {detail}")]
    Failed { detail: String },
    #[error("cancelled")]
    Cancelled,
}

impl Response {
    pub fn success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Worth retrying later: the receiver is overloaded, timing out or
    /// broken, which can pass. Other 4xx (and 3xx) will fail the same way.
    pub fn retryable(&self) -> bool {
        matches!(self.status, 408 | 425 | 429) || self.status >= 500
    }

    /// The status only: a receiver that echoes the request would put row
    /// data into WARNINGs (seen by writers who may not read every column)
    /// and `emit.stats`. The excerpt is kept only with dead letters.
    pub fn describe(&self, dest: &str) -> String {
        let kind = if (300..400).contains(&self.status) {
            " (redirects are not followed)"
        } else {
            ""
        };
        format!("HTTP {} from {}{kind}", self.status, quote(dest))
    }

    /// [`Response::describe`] without naming the destination.
    pub fn cause(&self) -> String {
        match (300..400).contains(&self.status) {
            true => format!("HTTP {} (redirects are not followed)", self.status),
            false => format!("HTTP {}", self.status),
        }
    }
}

/// `Retry-After` in seconds or as an HTTP date, capped at an hour.
pub fn parse_retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    let cap = Duration::from_secs(3600);
    if let Ok(s) = v.trim().parse::<u64>() {
        return Some(Duration::from_secs(s).min(cap));
    }
    httpdate::parse_http_date(v.trim())
        .ok()
        .map(|t| t.duration_since(now).unwrap_or_default().min(cap))
}

/// Performs `req` on the calling thread.
pub fn request(client: &Client, req: &Request) -> Result<Response, HttpError> {
    let started = Instant::now();
    let mut b = ureq::http::Request::builder()
        .method(req.method.as_str())
        .uri(req.url.as_str())
        .header("Content-Type", req.content_type.as_str());
    for (k, v) in &req.headers {
        b = b.header(k.as_str(), v.as_str());
    }
    let ts = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    // A Standard Webhooks signature sends (and signs) its own id.
    if let (Some(id), Signing::None | Signing::Emit(_)) = (&req.id, &req.signing) {
        b = b.header("webhook-id", id.as_str());
    }
    match &req.signing {
        Signing::None => {}
        Signing::Emit(secret) => {
            b = b
                .header("X-Emit-Timestamp", ts.to_string())
                .header("X-Emit-Signature", signature(secret, ts, &req.body));
        }
        Signing::Standard { id, secrets } => {
            let sigs: Vec<String> = secrets
                .iter()
                .map(|s| standard_signature(s, id, ts, &req.body))
                .collect();
            b = b
                .header("webhook-id", id.as_str())
                .header("webhook-timestamp", ts.to_string())
                .header("webhook-signature", sigs.join(" "));
        }
    }
    let http_req = b.body(req.body.as_slice()).map_err(|e| HttpError::Failed {
        detail: without(&e.to_string(), &req.url),
    })?;
    match client.agent.run(http_req) {
        Ok(mut resp) => {
            let status = resp.status().as_u16();
            let retry_after = resp
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| parse_retry_after(v, SystemTime::now()));
            let mut body = Vec::new();
            let _ = resp
                .body_mut()
                .as_reader()
                .take(DRAIN_BYTES)
                .read_to_end(&mut body);
            body.truncate(EXCERPT_BYTES);
            let excerpt = String::from_utf8_lossy(&body)
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .collect::<String>()
                .trim()
                .to_string();
            Ok(Response {
                status,
                excerpt,
                retry_after,
            })
        }
        Err(e) => Err(classify(e, &req.url, started)),
    }
}

fn classify(e: ureq::Error, url: &str, started: Instant) -> HttpError {
    match e {
        ureq::Error::Other(inner) => match inner.downcast::<Refused>() {
            Ok(r) => HttpError::NotAllowed(r.0),
            Err(other) => HttpError::Failed {
                detail: without(&other.to_string(), url),
            },
        },
        ureq::Error::Timeout(_) => HttpError::Timeout {
            ms: started.elapsed().as_millis(),
        },
        ureq::Error::HostNotFound => HttpError::Failed {
            detail: "host not found".into(),
        },
        ureq::Error::Io(io) if io.kind() == std::io::ErrorKind::ConnectionRefused => {
            HttpError::Failed {
                detail: "connection refused".into(),
            }
        }
        other => HttpError::Failed {
            detail: without(&other.to_string(), url),
        },
    }
}

/// `detail` (a library's error message) without `url`, which a stored
/// destination keeps out of sight (see [`HttpError`]).
fn without(detail: &str, url: &str) -> String {
    detail.replace(url, "the URL")
}

/// Performs `req` on a helper thread, waiting in slices that honour
/// `intr`. ureq bounds the request by the timeouts (including a response
/// body that stops coming, see the tests); the wait here is bounded too, a
/// second later, so that the bound holds whatever happens in the thread.
/// On cancel or timeout the thread is abandoned and ends by itself.
pub fn request_interruptible(
    client: &Client,
    req: Request,
    intr: &dyn Interrupt,
) -> Result<Response, HttpError> {
    let started = Instant::now();
    let deadline = started + client.config.request_timeout + Duration::from_secs(1);
    let (tx, rx) = mpsc::channel();
    let client = client.clone();
    super::spawn_without_signals("pg_emit-http", move || {
        let _ = tx.send(request(&client, &req));
    })
    .map_err(|e| HttpError::Failed {
        detail: e.to_string(),
    })?;
    loop {
        if let Err(Cancelled) = intr.check() {
            return Err(HttpError::Cancelled);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(HttpError::Timeout {
                ms: started.elapsed().as_millis(),
            });
        }
        intr.waiting(Some(super::WaitOn::Http));
        let got = rx.recv_timeout(SLICE.min(deadline - now));
        intr.waiting(None);
        match got {
            Ok(r) => return r,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(HttpError::Failed {
                    detail: "request thread failed".into(),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_signature_matches_the_specification_example() {
        // The example of the Standard Webhooks specification.
        let secret = &parse_secrets("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap()[0];
        assert_eq!(
            standard_signature(
                secret,
                "msg_p5jXN8AQM9LWM0D4loKWxJek",
                1614265330,
                br#"{"test": 2432232314}"#
            ),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert_eq!(
            parse_secrets(
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw  whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
            )
            .unwrap()
            .len(),
            2
        );
        for bad in [
            "",
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_!!!",
            "whsec_c2hvcnQ=",
        ] {
            assert!(parse_secrets(bad).is_err(), "{bad}");
        }
    }
    use crate::transport::Uninterruptible;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;

    fn client(allow: &str) -> Client {
        Client::new(ClientConfig {
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_millis(500),
            trust: Trust::System,
            allow: Allowlist::parse(allow).unwrap(),
            tls: Default::default(),
        })
        .unwrap()
    }

    /// Serves one request with `reply`, returning what it received.
    fn serve_once(reply: &'static str) -> (String, std::thread::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://127.0.0.1:{}/hook", l.local_addr().unwrap().port());
        let h = std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut head = String::new();
            let mut len = 0;
            loop {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; len];
            r.read_exact(&mut body).unwrap();
            (&s).write_all(reply.as_bytes()).unwrap();
            head + &String::from_utf8(body).unwrap()
        });
        (url, h)
    }

    fn post(url: &str, body: &str) -> Request {
        Request {
            method: "POST".into(),
            url: url.into(),
            content_type: "application/json".into(),
            headers: vec![("X-Trace".into(), "abc".into())],
            body: body.as_bytes().to_vec(),
            id: None,
            signing: Signing::Emit(b"k".to_vec()),
        }
    }

    #[test]
    fn posts_json_with_headers_and_signature() {
        let (url, h) = serve_once("HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok");
        let r =
            request_interruptible(&client(""), post(&url, "{\"a\":1}"), &Uninterruptible).unwrap();
        assert_eq!((r.status, r.excerpt.as_str()), (201, "ok"));
        let got = h.join().unwrap();
        assert!(got.starts_with("POST /hook HTTP/1.1\r\n"), "{got}");
        assert!(
            got.contains("content-type: application/json\r\n")
                || got.contains("Content-Type: application/json\r\n")
        );
        assert!(got.to_ascii_lowercase().contains("x-trace: abc\r\n"));
        let ts = got
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("x-emit-timestamp: ")
                    .map(str::to_string)
            })
            .unwrap();
        let sig = signature(b"k", ts.parse().unwrap(), b"{\"a\":1}");
        assert!(got.contains(&sig), "{got}");
        assert!(got.ends_with("\r\n\r\n{\"a\":1}"));
    }

    #[test]
    fn redirects_are_reported_not_followed() {
        let (url, h) = serve_once(
            "HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/\r\nContent-Length: 0\r\n\r\n",
        );
        let r = request(&client(""), &post(&url, "{}")).unwrap();
        h.join().unwrap();
        assert_eq!(r.status, 302);
        assert!(!r.retryable() && !r.success());
        assert!(r.describe(&url).contains("redirects are not followed"));
    }

    #[test]
    fn allowlist_applies_to_resolved_addresses() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://localhost:{}/", l.local_addr().unwrap().port());
        let e = request(&client("10.0.0.0/8"), &post(&url, "{}")).unwrap_err();
        assert!(
            matches!(e, HttpError::NotAllowed(ref m) if m.contains("allowed_destinations")),
            "{e}"
        );
        let e = request(&client(""), &post("http://169.254.169.254/latest", "{}")).unwrap_err();
        assert!(matches!(e, HttpError::NotAllowed(_)), "{e}");
    }

    #[test]
    fn a_body_that_stops_coming_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://127.0.0.1:{}/", l.local_addr().unwrap().port());
        let server = std::thread::spawn(move || {
            // Two requests on one kept-alive connection: the first answered
            // in full, the second with headers and part of the body.
            let (s, _) = l.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            for (head, body) in [
                ("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", "ok"),
                ("HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", "ab"),
            ] {
                let mut len = 0;
                loop {
                    let mut line = String::new();
                    r.read_line(&mut line).unwrap();
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap();
                    }
                    if line == "\r\n" {
                        break;
                    }
                }
                let mut got = vec![0; len];
                r.read_exact(&mut got).unwrap();
                // Headers and body in separate segments, as most servers
                // write them.
                (&s).write_all(head.as_bytes()).unwrap();
                std::thread::sleep(Duration::from_millis(50));
                (&s).write_all(body.as_bytes()).unwrap();
            }
            std::thread::sleep(Duration::from_secs(5));
        });
        let c = client("");
        assert_eq!(request(&c, &post(&url, "{}")).unwrap().status, 200);
        let t = Instant::now();
        let r = request(&c, &post(&url, "{}"));
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{:?} {r:?}",
            t.elapsed()
        );
        drop(server);
    }

    #[test]
    fn silent_server_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://127.0.0.1:{}/", l.local_addr().unwrap().port());
        let t = Instant::now();
        let e = request(&client(""), &post(&url, "{}")).unwrap_err();
        assert!(matches!(e, HttpError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2));
        drop(l);
    }

    /// A server that takes the connection and never answers the TLS
    /// handshake: a timeout, said as one.
    #[test]
    fn silent_https_server_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://127.0.0.1:{}/", l.local_addr().unwrap().port());
        let t = Instant::now();
        let e = request(&client(""), &post(&url, "{}")).unwrap_err();
        assert!(matches!(e, HttpError::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(4));
        drop(l);
    }

    /// TLS is made at the first https:// connection: an http:// request
    /// does not need it (nor a trust store), and a TLS file that cannot be
    /// read fails https:// requests, saying so.
    #[test]
    fn tls_is_made_for_https_only() {
        let mut c = client("").config;
        c.tls.ca_file = Some("/nonexistent/ca.pem".into());
        let c = Client::new(c).unwrap();
        let (url, h) = serve_once("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
        assert_eq!(request(&c, &post(&url, "{}")).unwrap().status, 200);
        h.join().unwrap();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://127.0.0.1:{}/", l.local_addr().unwrap().port());
        match request(&c, &post(&url, "{}")) {
            Err(HttpError::Failed { detail }) => assert!(detail.contains("ca_file"), "{detail}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn retry_after_forms() {
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after("3", now), Some(Duration::from_secs(3)));
        assert_eq!(
            parse_retry_after("999999", now),
            Some(Duration::from_secs(3600))
        );
        let date = httpdate::fmt_http_date(now + Duration::from_secs(10));
        assert_eq!(parse_retry_after(&date, now), Some(Duration::from_secs(10)));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    #[test]
    fn signature_is_stable() {
        // Reference value computed with Python's hmac module.
        assert_eq!(
            signature(b"secret", 1700000000, b"{\"id\":1}"),
            "v1=3dd1b9aef568d75f6790a84bd2e5dfa1f44409eef3cbdbd3f10b837376100c11"
        );
    }
}
