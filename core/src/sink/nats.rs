//! NATS JetStream: publish each event to a subject and wait for the
//! stream's acknowledgement, pipelined on one connection.
//!
//! Like Redis, the part of the NATS client protocol pg_emit needs is
//! small and text-based (`CONNECT`, `SUB`, `HPUB`, `PING`/`PONG`, reading
//! `MSG`/`HMSG` replies), so it is spoken over pg_emit's own TCP transport
//! (see [`super`]), and no async runtime has to live inside the worker (the
//! NATS project's Rust client needs tokio).
//!
//! An event counts as delivered when JetStream's PubAck came back for it.
//! Each publish carries `Nats-Msg-Id`, the event's id: a retry after a
//! lost acknowledgement (a crash, a broken connection) is dropped by the
//! stream's duplicate window, so every event is in the stream once.

use super::{Broker, Item, Settings, TLS_OPTIONS};
use crate::security::Allowlist;
use crate::transport::tcp::SendError;
use crate::transport::tls::{self, Link};
use crate::transport::{host_port, Interrupt, Timeouts};
use std::collections::HashMap;
use std::time::Instant;

/// A subject on a NATS server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub host: String,
    pub port: u16,
    pub subject: String,
    pub auth: Option<Auth>,
    /// `tls://`: TLS whatever the server's `INFO` says (without it, TLS
    /// when the server requires it).
    pub tls_url: bool,
    /// `tls_first`: the handshake before anything else (a server with
    /// `handshake_first`).
    pub tls_first: bool,
    pub tls: tls::Options,
}

/// Credentials from a stored destination's options.
#[derive(Clone, PartialEq, Eq)]
pub enum Auth {
    UserPassword {
        user: String,
        password: String,
    },
    Token(String),
    /// An NKey user's seed (`SU…`): the server's nonce is signed with it.
    NKey(String),
    /// A `.creds` file's text: its JWT is sent, the nonce signed with its
    /// seed.
    Creds(String),
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Auth::UserPassword { user, .. } => write!(f, "UserPassword({user:?}, <hidden>)"),
            Auth::Token(_) => f.write_str("Token(<hidden>)"),
            Auth::NKey(_) => f.write_str("NKey(<hidden>)"),
            Auth::Creds(_) => f.write_str("Creds(<hidden>)"),
        }
    }
}

impl Broker for Subject {
    const SCHEME: &'static str = "nats";
    const TLS_SCHEME: Option<&'static str> = Some("tls");
    const PORT: u16 = 4222;
    const FORM: &'static str = "a nats:// URL is nats://host[:port]/subject (tls:// for TLS), \
         the subject dot-separated tokens without wildcards";
    const OPTIONS: &'static [&'static str] = &[
        "username",
        "password",
        "token",
        "nkey_seed",
        "creds",
        "tls_first",
        TLS_OPTIONS[0],
        TLS_OPTIONS[1],
        TLS_OPTIONS[2],
        TLS_OPTIONS[3],
    ];
    type Conn = Conn;
    type Error = NatsError;

    fn from_url(u: &url::Url, host: String) -> Result<Option<Self>, String> {
        let subject = u.path().strip_prefix('/').unwrap_or_default();
        if !check_subject(subject) || u.query().is_some() || u.fragment().is_some() {
            return Ok(None);
        }
        Ok(Some(Subject {
            host,
            port: u.port().unwrap_or(Self::PORT),
            subject: subject.to_string(),
            auth: None,
            tls_url: u.scheme() == "tls",
            tls_first: false,
            tls: tls::Options::default(),
        }))
    }

    fn tls(&self) -> bool {
        self.tls_url
    }

    fn tls_options(&self) -> Option<&tls::Options> {
        Some(&self.tls)
    }

    fn url(&self) -> String {
        format!(
            "{}://{}/{}",
            if self.tls_url { "tls" } else { "nats" },
            host_port(&self.host, self.port),
            self.subject
        )
    }

    fn address(&self) -> (&str, u16) {
        (&self.host, self.port)
    }

    fn configure(&mut self, s: &Settings<'_>) -> Result<(), String> {
        self.auth = match (s.username, s.password, s.token, s.nkey_seed, s.creds) {
            (Some(user), Some(password), None, None, None) => Some(Auth::UserPassword {
                user: user.to_string(),
                password: password.to_string(),
            }),
            (None, Some(_), None, None, None) => {
                return Err("a NATS password needs its username".into())
            }
            (None, None, Some(token), None, None) => Some(Auth::Token(token.to_string())),
            (None, None, None, Some(seed), None) => {
                super::nkey::UserKey::from_seed(seed)?;
                Some(Auth::NKey(seed.to_string()))
            }
            (None, None, None, None, Some(creds)) => {
                super::nkey::Creds::parse(creds)?;
                Some(Auth::Creds(creds.to_string()))
            }
            (None, None, None, None, None) => None,
            _ => {
                return Err(
                    "give one of a username and password, a token, an nkey_seed or creds".into(),
                )
            }
        };
        s.tls.check()?;
        self.tls = s.tls.clone();
        self.tls_first = s.tls_first;
        Ok(())
    }

    fn send(
        &self,
        conn: &mut Option<Conn>,
        items: &[Item<'_>],
        timeouts: &Timeouts,
        allow: &Allowlist,
        intr: &dyn Interrupt,
    ) -> (usize, Result<(), NatsError>) {
        publish(conn, self, items, timeouts, allow, intr)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    #[error("{0}")]
    Send(#[from] SendError),
    #[error("nats server: {0}")]
    Server(String),
    #[error(
        "no JetStream stream captures subject {0:?} (create one that does, e.g. `nats stream add`)"
    )]
    NoStream(String),
    #[error("JetStream refused the message: {0}")]
    Refused(String),
    #[error("nats sent something unexpected: {0}")]
    Protocol(String),
}

/// Whether `s` is a subject one can publish to: dot-separated tokens of
/// printable characters, without wildcards.
pub fn check_subject(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|t| {
            !t.is_empty()
                && t != "*"
                && t != ">"
                && t.chars()
                    .all(|c| c.is_ascii_graphic() && c != '*' && c != '>')
        })
}

/// Acknowledgements awaited at once: enough to keep JetStream busy, few
/// enough that a failure resends little.
const IN_FLIGHT: usize = 256;

/// A connection with its reply inbox, and the subject (with credentials)
/// it was opened for.
pub struct Conn {
    link: Link,
    inbox: String,
    buf: Vec<u8>,
    /// The reply subject of the next publish is `<inbox>.<next>`: numbers
    /// are never reused on a connection, so a late or second reply to an
    /// earlier publish cannot pass for a later one's acknowledgement.
    next: u64,
    opened_for: Subject,
}

/// Longest message accepted from the server: acknowledgements are a few
/// dozen bytes.
const MAX_REPLY: usize = 64 * 1024;

/// Publishes `messages` with header `Nats-Msg-Id` and waits for their
/// acknowledgements (see [`Broker::send`]).
fn publish(
    slot: &mut Option<Conn>,
    target: &Subject,
    messages: &[Item<'_>],
    timeouts: &Timeouts,
    allow: &Allowlist,
    intr: &dyn Interrupt,
) -> (usize, Result<(), NatsError>) {
    let mut conn = match connection(slot.take(), target, timeouts, allow, intr) {
        Ok(c) => c,
        Err(e) => return (0, Err(e)),
    };
    let mut done = 0;
    let mut out = Vec::new();
    for chunk in messages.chunks(IN_FLIGHT) {
        out.clear();
        let base = conn.next;
        conn.next += chunk.len() as u64;
        for (k, m) in chunk.iter().enumerate() {
            let headers = format!("NATS/1.0\r\nNats-Msg-Id: {}\r\n\r\n", m.id);
            out.extend_from_slice(
                format!(
                    "HPUB {} {}.{} {} {}\r\n",
                    target.subject,
                    conn.inbox,
                    base + k as u64,
                    headers.len(),
                    headers.len() + m.body.len()
                )
                .as_bytes(),
            );
            out.extend_from_slice(headers.as_bytes());
            out.extend_from_slice(m.body);
            out.extend_from_slice(b"\r\n");
        }
        if let Err(e) = conn.link.write_all(&out, timeouts, intr) {
            return (done, Err(e.into()));
        }
        // Acks may come in any order; what counts is the acknowledged
        // prefix.
        let mut acked: HashMap<usize, Result<(), NatsError>> = HashMap::new();
        let mut prefix = 0;
        // One deadline for the chunk's acks: a server that trickles them
        // holds the sender no longer than a silent one.
        let deadline = Instant::now() + timeouts.write;
        while prefix < chunk.len() {
            match next_reply(&mut conn, deadline, timeouts, intr) {
                Ok(Some((n, r))) if (base..conn.next).contains(&n) => {
                    acked.insert((n - base) as usize, r);
                    while let Some(r) = acked.remove(&prefix) {
                        if let Err(e) = r {
                            let e = match e {
                                NatsError::NoStream(_) => {
                                    NatsError::NoStream(target.subject.clone())
                                }
                                e => e,
                            };
                            return (done + prefix, Err(e));
                        }
                        prefix += 1;
                    }
                }
                // Not an acknowledgement of this chunk.
                Ok(_) => {}
                Err(e) => return (done + prefix, Err(e)),
            }
        }
        done += prefix;
    }
    *slot = Some(conn);
    (done, Ok(()))
}

/// The kept connection if it is still open and its peer still allowed,
/// else a new one: `INFO` read, `CONNECT` sent and confirmed by a `PONG`,
/// the reply inbox subscribed.
fn connection(
    kept: Option<Conn>,
    target: &Subject,
    timeouts: &Timeouts,
    allow: &Allowlist,
    intr: &dyn Interrupt,
) -> Result<Conn, NatsError> {
    if let Some(mut c) = kept {
        let peer_allowed = c
            .link
            .peer_addr()
            .is_some_and(|a| allow.filter(&target.host, target.port, None, &[a]).is_ok());
        // What the server sent since (a `PING`, say) stays in the buffer,
        // answered before the next acks.
        if c.opened_for == *target && peer_allowed && c.link.read_ready(&mut c.buf) {
            return Ok(c);
        }
    }
    let deadline = Instant::now() + timeouts.connect;
    // A server configured for TLS first (`handshake_first`) says nothing
    // until the handshake: `tls_first` starts it at once, as the official
    // clients' TLSHandshakeFirst does (a guess from a silent server would
    // break TLS servers whose INFO is merely slow).
    let first_tls = target.tls_first.then_some(&target.tls);
    let link = Link::open(&target.host, target.port, first_tls, timeouts, allow, intr)?;
    let mut conn = Conn {
        link,
        inbox: format!("_INBOX.pg_emit.{}", inbox_token()),
        buf: Vec::new(),
        next: 0,
        opened_for: target.clone(),
    };
    let wants_tls = target.tls_url || target.tls_first || !target.tls.is_empty();
    let info = read_line(&mut conn, deadline, intr)?;
    let Some(info) = info.strip_prefix("INFO ") else {
        return Err(NatsError::Protocol(format!("expected INFO, got {info:?}")));
    };
    let info: serde_json::Value = serde_json::from_str(info)
        .map_err(|e| NatsError::Protocol(format!("INFO is not JSON: {e}")))?;
    let offered = |k: &str| info[k] == serde_json::Value::Bool(true);
    // TLS is started when the server asks for it (verified against the
    // system's CAs or `ca_file`), and a tls:// URL or TLS option never
    // settles for less. A plain nats:// URL trusts the INFO it is sent in
    // the clear, as NATS clients do: someone on the path could remove
    // `tls_required` from it, which a tls:// URL prevents.
    if !conn.link.is_tls() {
        if offered("tls_required") || (wants_tls && offered("tls_available")) {
            // Anything after INFO came in the clear: it must not pass for
            // what the server says over TLS (STARTTLS command injection).
            if !conn.buf.is_empty() {
                return Err(NatsError::Protocol(
                    "the server sent more than INFO before TLS".into(),
                ));
            }
            conn.link = conn
                .link
                .start_tls(&target.host, &target.tls, deadline, intr)?;
        } else if wants_tls {
            return Err(NatsError::Server(
                "the server does not offer TLS (a tls:// URL or TLS options ask for it)".into(),
            ));
        }
    }
    let mut connect = serde_json::json!({
        "verbose": false, "pedantic": false, "headers": true, "no_responders": true,
        "name": "pg_emit", "lang": "rust", "version": env!("CARGO_PKG_VERSION"), "protocol": 1,
    });
    match &target.auth {
        Some(Auth::UserPassword { user, password }) => {
            connect["user"] = user.as_str().into();
            connect["pass"] = password.as_str().into();
        }
        Some(Auth::Token(t)) => connect["auth_token"] = t.as_str().into(),
        Some(Auth::NKey(seed)) => {
            let Some(nonce) = info["nonce"].as_str() else {
                return Err(NatsError::Server(
                    "the server sent no nonce to sign (is it configured for NKeys?)".into(),
                ));
            };
            let key = super::nkey::UserKey::from_seed(seed).map_err(NatsError::Server)?;
            connect["nkey"] = key.public().into();
            connect["sig"] = key.sign(nonce).into();
        }
        Some(Auth::Creds(text)) => {
            let Some(nonce) = info["nonce"].as_str() else {
                return Err(NatsError::Server(
                    "the server sent no nonce to sign (is it in operator mode, for JWT users?)"
                        .into(),
                ));
            };
            let creds = super::nkey::Creds::parse(text).map_err(NatsError::Server)?;
            connect["jwt"] = creds.jwt.into();
            connect["sig"] = creds.key.sign(nonce).into();
        }
        None => {}
    }
    let hello = format!("CONNECT {connect}\r\nPING\r\nSUB {}.* 1\r\n", conn.inbox);
    conn.link.write_all(hello.as_bytes(), timeouts, intr)?;
    loop {
        let line = read_line(&mut conn, deadline, intr)?;
        match line.as_str() {
            "PONG" => return Ok(conn),
            "+OK" => {}
            l if l.starts_with("-ERR") => return Err(NatsError::Server(server_error(l))),
            l if l.starts_with("INFO ") => {}
            l => return Err(NatsError::Protocol(format!("expected PONG, got {l:?}"))),
        }
    }
}

/// A token for the inbox: unique enough per process and connection.
fn inbox_token() -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{nanos:x}{:x}{n:x}", std::process::id())
}

fn server_error(line: &str) -> String {
    line.trim_start_matches("-ERR")
        .trim()
        .trim_matches('\'')
        .to_string()
}

/// One control line (without CRLF), reading as needed. Bytes already
/// searched are not searched again, and a line longer than [`MAX_REPLY`]
/// is an error: a server that never ends a line costs neither quadratic
/// time nor unbounded memory.
fn read_line(
    conn: &mut Conn,
    deadline: Instant,
    intr: &dyn Interrupt,
) -> Result<String, NatsError> {
    let mut searched: usize = 0;
    loop {
        let from = searched.saturating_sub(1);
        if let Some(at) = conn.buf[from..].windows(2).position(|w| w == b"\r\n") {
            let end = from + at;
            let line = String::from_utf8_lossy(&conn.buf[..end]).into_owned();
            conn.buf.drain(..end + 2);
            return Ok(line);
        }
        searched = conn.buf.len();
        if searched > MAX_REPLY {
            return Err(NatsError::Protocol(format!(
                "a line of over {MAX_REPLY} bytes"
            )));
        }
        conn.link.read_some(&mut conn.buf, deadline, intr)?;
    }
}

/// The outcome of publish number `n` on a connection.
type Ack = (u64, Result<(), NatsError>);

/// The next acknowledgement: `Some((n, outcome))` for the reply to publish
/// number `n`, `None` for anything else (a server `PING`,
/// answered here).
fn next_reply(
    conn: &mut Conn,
    deadline: Instant,
    timeouts: &Timeouts,
    intr: &dyn Interrupt,
) -> Result<Option<Ack>, NatsError> {
    let line = read_line(conn, deadline, intr)?;
    let mut parts = line.split_ascii_whitespace();
    let (hdr_len, total, subject) = match parts.next() {
        Some("MSG") => {
            let f: Vec<&str> = parts.collect();
            let total = f.last().and_then(|n| n.parse::<usize>().ok());
            (Some(0), total, f.first().copied())
        }
        Some("HMSG") => {
            let f: Vec<&str> = parts.collect();
            let n = f.len();
            let nums = |i: usize| f.get(i).and_then(|x| x.parse::<usize>().ok());
            (
                nums(n.wrapping_sub(2)),
                nums(n.wrapping_sub(1)),
                f.first().copied(),
            )
        }
        Some("PING") => {
            conn.link.write_all(b"PONG\r\n", timeouts, intr)?;
            return Ok(None);
        }
        Some("PONG" | "+OK" | "INFO") => return Ok(None),
        Some(e) if e.starts_with("-ERR") => return Err(NatsError::Server(server_error(&line))),
        _ => return Err(NatsError::Protocol(format!("unexpected {line:?}"))),
    };
    let (Some(hdr_len), Some(total), Some(subject)) = (hdr_len, total, subject) else {
        return Err(NatsError::Protocol(format!("malformed {line:?}")));
    };
    if total > MAX_REPLY || hdr_len > total {
        return Err(NatsError::Protocol(format!(
            "an oversized or malformed {line:?}"
        )));
    }
    while conn.buf.len() < total + 2 {
        conn.link.read_some(&mut conn.buf, deadline, intr)?;
    }
    let body: Vec<u8> = conn.buf.drain(..total + 2).take(total).collect();
    let (headers, payload) = body.split_at(hdr_len.min(total));
    let k = subject
        .strip_prefix(conn.inbox.as_str())
        .and_then(|s| s.strip_prefix('.'))
        .and_then(|s| s.parse::<u64>().ok());
    let Some(k) = k else {
        return Ok(None);
    };
    Ok(Some((k, ack(headers, payload))))
}

/// What a reply says about one publish.
fn ack(headers: &[u8], payload: &[u8]) -> Result<(), NatsError> {
    let status = std::str::from_utf8(headers)
        .ok()
        .and_then(|h| h.lines().next())
        .and_then(|l| l.strip_prefix("NATS/1.0"))
        .map(str::trim)
        .unwrap_or("");
    if status.starts_with("503") {
        return Err(NatsError::NoStream(String::new()));
    }
    if !status.is_empty() {
        return Err(NatsError::Refused(status.to_string()));
    }
    let v: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| NatsError::Protocol(format!("a PubAck that is not JSON: {e}")))?;
    if let Some(err) = v.get("error") {
        let why = err
            .get("description")
            .and_then(|d| d.as_str())
            .unwrap_or("unknown error");
        return Err(NatsError::Refused(why.to_string()));
    }
    if v.get("stream").is_some() {
        // `"duplicate": true` is a success too: the stream has it already.
        return Ok(());
    }
    Err(NatsError::Protocol(format!("not a PubAck: {v}")))
}

impl super::BrokerError for NatsError {
    fn network(self) -> Result<SendError, String> {
        match self {
            NatsError::Send(s) => Ok(s),
            e => Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects() {
        assert!(check_subject("orders.created"));
        assert!(check_subject("orders"));
        for bad in ["", "a..b", "a.*", "a.>", "a b", ".a", "a."] {
            assert!(!check_subject(bad), "{bad:?}");
        }
    }

    #[test]
    fn acks() {
        assert!(ack(b"", br#"{"stream":"S","seq":4}"#).is_ok());
        assert!(ack(b"", br#"{"stream":"S","seq":4,"duplicate":true}"#).is_ok());
        assert!(matches!(
            ack(b"NATS/1.0 503\r\n\r\n", b""),
            Err(NatsError::NoStream(_))
        ));
        let e = ack(
            b"",
            br#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#,
        );
        assert!(e
            .unwrap_err()
            .to_string()
            .contains("maximum messages exceeded"));
        assert!(ack(b"", b"nope").is_err());
    }

    /// A server whose first line never ends: refused once it passes
    /// MAX_REPLY, in far less than the timeout.
    #[test]
    fn an_endless_line_is_refused() {
        use std::io::Write as _;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let chunk = [b'x'; 4096];
            let _ = s.write_all(b"INFO ");
            while s.write_all(&chunk).is_ok() {}
        });
        let subject = Subject {
            host: "127.0.0.1".into(),
            port,
            subject: "s".into(),
            auth: None,
            tls_url: false,
            tls_first: false,
            tls: tls::Options::default(),
        };
        let timeouts = Timeouts {
            connect: std::time::Duration::from_secs(5),
            write: std::time::Duration::from_secs(5),
            stall: false,
        };
        let started = Instant::now();
        let (_, r) = publish(
            &mut None,
            &subject,
            &[Item {
                id: "1",
                key: None,
                record_key: None,
                body: b"{}",
                content_type: "application/json",
            }],
            &timeouts,
            &crate::security::Allowlist::default(),
            &crate::transport::Uninterruptible,
        );
        assert!(
            matches!(&r, Err(NatsError::Protocol(m)) if m.contains("a line of over")),
            "{r:?}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn credentials_stay_out_of_debug_output() {
        let a = Auth::UserPassword {
            user: "u".into(),
            password: "s3cret".into(),
        };
        assert!(!format!("{a:?}").contains("s3cret"));
        assert!(!format!("{:?}", Auth::Token("t0k".into())).contains("t0k"));
    }
}
