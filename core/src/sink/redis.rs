//! Redis Streams: one `XADD` per event, pipelined on one connection.
//!
//! The protocol pg_emit needs is three commands of RESP2 (`AUTH`, `XADD`,
//! and reading their replies), so it is spoken here over pg_emit's own TCP
//! transport rather than through a client crate, whose own connect would
//! bypass the allowlist (see [`super`]).
//!
//! An event counts as delivered when its `XADD` reply (the entry's id) has
//! come back. Redis cannot drop a repeated entry, so an event whose reply
//! was lost (a crash, a broken connection) is added again when it is
//! retried: consumers de-duplicate by the entry's `id` field.

use super::{Broker, Item, Settings, TLS_OPTIONS};
use crate::security::Allowlist;
use crate::transport::tcp::SendError;
use crate::transport::tls::{self, Link};
use crate::transport::{host_port, Interrupt, Timeouts};
use std::time::Instant;

/// A stream on a Redis server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stream {
    pub host: String,
    pub port: u16,
    /// The stream's key.
    pub key: String,
    /// `XADD … MAXLEN ~ n`: keep about the newest `n` entries.
    pub maxlen: Option<u64>,
    pub auth: Option<Auth>,
    /// `rediss://`: TLS, with these options.
    pub tls: Option<tls::Options>,
}

/// `AUTH [username] password`, from a stored destination's options.
#[derive(Clone, PartialEq, Eq)]
pub struct Auth {
    pub username: Option<String>,
    pub password: String,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Auth {{ username: {:?}, password: <hidden> }}",
            self.username
        )
    }
}

impl Broker for Stream {
    const SCHEME: &'static str = "redis";
    const TLS_SCHEME: Option<&'static str> = Some("rediss");
    const PORT: u16 = 6379;
    const FORM: &'static str =
        "a redis:// URL is redis://host[:port]/stream[?maxlen=N] (rediss:// for TLS)";
    const OPTIONS: &'static [&'static str] = &[
        "username",
        "password",
        "maxlen",
        TLS_OPTIONS[0],
        TLS_OPTIONS[1],
        TLS_OPTIONS[2],
        TLS_OPTIONS[3],
    ];
    type Conn = Conn;
    type Error = RedisError;

    fn from_url(u: &url::Url, host: String) -> Result<Option<Self>, String> {
        let key = percent_decode(u.path().strip_prefix('/').unwrap_or_default())
            .ok_or("the stream name is not valid percent-encoded UTF-8")?;
        if key.is_empty() || u.fragment().is_some() {
            return Ok(None);
        }
        let mut maxlen = None;
        for (k, v) in u.query_pairs() {
            match (k.as_ref(), v.parse::<u64>()) {
                ("maxlen", Ok(n)) if n > 0 => maxlen = Some(n),
                _ => {
                    return Err(format!(
                        "unknown parameter {k}={v} (known: maxlen=N, a positive integer)"
                    ))
                }
            }
        }
        Ok(Some(Stream {
            host,
            port: u.port().unwrap_or(Self::PORT),
            key,
            maxlen,
            auth: None,
            tls: (u.scheme() == "rediss").then(tls::Options::default),
        }))
    }

    fn tls(&self) -> bool {
        self.tls.is_some()
    }

    fn tls_options(&self) -> Option<&tls::Options> {
        self.tls.as_ref()
    }

    fn url(&self) -> String {
        let mut key = Vec::new();
        crate::cloudevents::percent_encode_path(&mut key, &self.key);
        let key = String::from_utf8(key).expect("percent-encoding leaves ASCII");
        let at = host_port(&self.host, self.port);
        let scheme = match self.tls {
            Some(_) => "rediss",
            None => "redis",
        };
        match self.maxlen {
            Some(n) => format!("{scheme}://{at}/{key}?maxlen={n}"),
            None => format!("{scheme}://{at}/{key}"),
        }
    }

    fn address(&self) -> (&str, u16) {
        (&self.host, self.port)
    }

    fn configure(&mut self, s: &Settings<'_>) -> Result<(), String> {
        if let Some(n) = s.maxlen {
            if n == 0 {
                return Err("maxlen must be a positive number of entries".into());
            }
            self.maxlen = Some(n);
        }
        self.auth = s.password.map(|password| Auth {
            username: s.username.map(str::to_string),
            password: password.to_string(),
        });
        match &mut self.tls {
            Some(t) => {
                s.tls.check()?;
                *t = s.tls.clone();
            }
            None if !s.tls.is_empty() => {
                return Err("ca_file, cert_file, key_file and server_name are for TLS: \
                            use a rediss:// URL"
                    .into())
            }
            None => {}
        }
        Ok(())
    }

    fn send(
        &self,
        conn: &mut Option<Conn>,
        items: &[Item<'_>],
        timeouts: &Timeouts,
        allow: &Allowlist,
        intr: &dyn Interrupt,
    ) -> (usize, Result<(), RedisError>) {
        xadd(conn, self, items, timeouts, allow, intr)
    }
}

/// `%XX` sequences as the bytes they stand for (a URL path segment; `+`
/// is itself), or `None` when that is not UTF-8 or a `%` is malformed.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("{0}")]
    Send(#[from] SendError),
    /// An error reply: the server refused the command.
    #[error("redis replied {0}")]
    Refused(String),
    #[error("redis sent something that is not RESP: {0}")]
    Protocol(String),
}

/// A parsed RESP2 reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
}

/// Longest bulk reply accepted: `AUTH` and `XADD` answer with a few
/// dozen bytes, so anything near this is not a reply to them. With
/// [`MAX_LINE`] it bounds what a pipeline's replies can hold in memory.
const MAX_BULK: i64 = 1024;

/// Longest reply line accepted (error messages included).
const MAX_LINE: usize = 1024;

/// Parses one reply from the start of `buf`: `Ok(None)` while it is
/// incomplete, else the reply and the bytes it took. Only the reply types
/// `AUTH` and `XADD` give are accepted: arrays (which a hostile server
/// could nest without end) and oversized bulk strings are errors.
pub fn parse(buf: &[u8]) -> Result<Option<(Reply, usize)>, String> {
    let Some(end) = buf.windows(2).position(|w| w == b"\r\n") else {
        // A line that never ends would be searched again at every arrival.
        if buf.len() > MAX_LINE {
            return Err(format!("a reply line of over {MAX_LINE} bytes"));
        }
        return Ok(None);
    };
    if end == 0 {
        return Err("an empty reply line".into());
    }
    let line = std::str::from_utf8(&buf[1..end]).map_err(|e| e.to_string())?;
    let after = end + 2;
    let int = || {
        line.parse::<i64>()
            .map_err(|_| format!("bad length or integer {line:?}"))
    };
    match buf[0] {
        b'+' => Ok(Some((Reply::Simple(line.to_string()), after))),
        b'-' => Ok(Some((Reply::Error(line.to_string()), after))),
        b':' => Ok(Some((Reply::Integer(int()?), after))),
        b'$' => {
            let n = int()?;
            if n < 0 {
                return Ok(Some((Reply::Bulk(None), after)));
            }
            if n > MAX_BULK {
                return Err(format!(
                    "a {n}-byte reply, where a few dozen bytes were expected"
                ));
            }
            let n = n as usize;
            if buf.len() < after + n + 2 {
                return Ok(None);
            }
            Ok(Some((
                Reply::Bulk(Some(buf[after..after + n].to_vec())),
                after + n + 2,
            )))
        }
        other => Err(format!("unexpected reply type {:?}", char::from(other))),
    }
}

/// Appends one command in RESP2's array-of-bulk-strings form.
pub fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    use std::io::Write as _;
    let _ = write!(out, "*{}\r\n", args.len());
    for a in args {
        let _ = write!(out, "${}\r\n", a.len());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
}

/// Commands per pipelined write: enough to keep the server busy, few
/// enough that a failure resends little.
const PIPELINE: usize = 512;

/// A connection and the stream (with credentials) it was opened for.
pub struct Conn {
    link: Link,
    opened_for: Stream,
}

/// Adds `entries` to the stream as entries with fields `id` and `event`
/// (see [`Broker::send`]; a connection is authenticated as it opens).
fn xadd(
    slot: &mut Option<Conn>,
    stream: &Stream,
    entries: &[Item<'_>],
    timeouts: &Timeouts,
    allow: &Allowlist,
    intr: &dyn Interrupt,
) -> (usize, Result<(), RedisError>) {
    let mut conn = match connection(slot.take(), stream, timeouts, allow, intr) {
        Ok(c) => c,
        Err(e) => return (0, Err(e)),
    };
    let link = &mut conn.link;
    let maxlen = stream.maxlen.map(|n| n.to_string());
    let mut done = 0;
    let mut out = Vec::new();
    let mut replies = Vec::new();
    for chunk in entries.chunks(PIPELINE) {
        out.clear();
        for e in chunk {
            let mut args: Vec<&[u8]> = vec![b"XADD", stream.key.as_bytes()];
            if let Some(n) = &maxlen {
                args.extend([&b"MAXLEN"[..], b"~", n.as_bytes()]);
            }
            args.extend([&b"*"[..], b"id", e.id.as_bytes(), b"event", e.body]);
            command(&mut out, &args);
        }
        if let Err(e) = link.write_all(&out, timeouts, intr) {
            return (done, Err(e.into()));
        }
        match read_replies(link, &mut replies, chunk.len(), timeouts, intr) {
            Ok(got) => {
                for r in got {
                    match r {
                        Reply::Bulk(Some(_)) => done += 1,
                        Reply::Error(msg) => {
                            return (done, Err(RedisError::Refused(format!("to XADD: {msg}"))))
                        }
                        other => {
                            return (
                                done,
                                Err(RedisError::Protocol(format!("XADD replied {other:?}"))),
                            )
                        }
                    }
                }
            }
            Err((got, e)) => return (done + got, Err(e)),
        }
    }
    *slot = Some(conn);
    (done, Ok(()))
}

/// The kept connection if it is still open and its peer still allowed,
/// else a new one, authenticated.
fn connection(
    kept: Option<Conn>,
    stream: &Stream,
    timeouts: &Timeouts,
    allow: &Allowlist,
    intr: &dyn Interrupt,
) -> Result<Conn, RedisError> {
    if let Some(mut c) = kept {
        let peer_allowed = c
            .link
            .peer_addr()
            .is_some_and(|a| allow.filter(&stream.host, stream.port, None, &[a]).is_ok());
        if c.opened_for == *stream && peer_allowed && !c.link.peer_closed() {
            return Ok(c);
        }
    }
    let mut link = Link::open(
        &stream.host,
        stream.port,
        stream.tls.as_ref(),
        timeouts,
        allow,
        intr,
    )?;
    if let Some(auth) = &stream.auth {
        let mut out = Vec::new();
        match &auth.username {
            Some(user) => command(
                &mut out,
                &[b"AUTH", user.as_bytes(), auth.password.as_bytes()],
            ),
            None => command(&mut out, &[b"AUTH", auth.password.as_bytes()]),
        }
        link.write_all(&out, timeouts, intr)?;
        let mut replies = Vec::new();
        match read_replies(&mut link, &mut replies, 1, timeouts, intr) {
            Ok(mut r) => match r.pop() {
                Some(Reply::Simple(_)) => {}
                Some(Reply::Error(msg)) => {
                    return Err(RedisError::Refused(format!("to AUTH: {msg}")))
                }
                other => return Err(RedisError::Protocol(format!("AUTH replied {other:?}"))),
            },
            Err((_, e)) => return Err(e),
        }
    }
    Ok(Conn {
        link,
        opened_for: stream.clone(),
    })
}

/// Reads `n` replies. On failure, also says how many whole replies came
/// before it (the caller counts those that were successes).
fn read_replies(
    link: &mut Link,
    buf: &mut Vec<u8>,
    n: usize,
    timeouts: &Timeouts,
    intr: &dyn Interrupt,
) -> Result<Vec<Reply>, (usize, RedisError)> {
    buf.clear();
    let mut got = Vec::with_capacity(n);
    let mut at = 0;
    let deadline = Instant::now() + timeouts.write;
    while got.len() < n {
        match parse(&buf[at..]) {
            Ok(Some((r, used))) => {
                at += used;
                got.push(r);
                continue;
            }
            Ok(None) => {}
            Err(e) => return Err((successes(&got), RedisError::Protocol(e))),
        }
        // One deadline for all of them: a server that trickles its replies
        // a byte at a time holds the sender no longer than a silent one.
        if let Err(e) = link.read_some(buf, deadline, intr) {
            return Err((successes(&got), e.into()));
        }
    }
    Ok(got)
}

/// Leading successful XADD replies.
fn successes(replies: &[Reply]) -> usize {
    replies
        .iter()
        .take_while(|r| matches!(r, Reply::Bulk(Some(_))))
        .count()
}

impl super::BrokerError for RedisError {
    fn network(self) -> Result<SendError, String> {
        match self {
            RedisError::Send(s) => Ok(s),
            e => Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_arrays_of_bulk_strings() {
        let mut out = Vec::new();
        command(
            &mut out,
            &[b"XADD", b"s", b"*", b"event", b"{\"a\":\"\r\n\"}"],
        );
        assert_eq!(
            out,
            b"*5\r\n$4\r\nXADD\r\n$1\r\ns\r\n$1\r\n*\r\n$5\r\nevent\r\n$10\r\n{\"a\":\"\r\n\"}\r\n"
        );
    }

    #[test]
    fn replies_parse_and_wait_for_more() {
        assert_eq!(
            parse(b"$15\r\n1700000000000-0\r\n+OK").unwrap(),
            Some((Reply::Bulk(Some(b"1700000000000-0".to_vec())), 22))
        );
        assert_eq!(parse(b"$15\r\n1700000").unwrap(), None);
        assert_eq!(
            parse(b"-WRONGTYPE Operation\r\n").unwrap().unwrap().0,
            Reply::Error("WRONGTYPE Operation".into())
        );
        assert_eq!(parse(b":7\r\n").unwrap().unwrap().0, Reply::Integer(7));
        // What a hostile server could use against the parser.
        assert!(parse(&b"*1\r\n".repeat(100_000)).is_err(), "no nesting");
        assert!(parse(b"\r\n").is_err());
        assert!(parse(b"$99999999999\r\n").is_err());
        assert!(parse(b"?x\r\n").is_err());
        assert!(parse(&[b'+'; 2000]).is_err(), "a line that never ends");
        assert!(parse(b"$2000\r\n").is_err(), "a reply XADD never gives");
    }

    /// A server that answers one byte every 50 ms, for ever: the whole
    /// pipeline's replies have one write_timeout (0.2.0 restarted it at
    /// every byte and held a writer as long as the server liked).
    #[test]
    fn a_trickling_server_gets_one_deadline() {
        use std::io::{Read as _, Write as _};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut scratch = [0u8; 4096];
            let _ = s.read(&mut scratch);
            for b in b"$15\r\n1700000000000-0\r\n".iter().cycle() {
                if s.write_all(&[*b]).is_err() {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        });
        let stream = Stream {
            host: "127.0.0.1".into(),
            port,
            key: "s".into(),
            maxlen: None,
            auth: None,
            tls: None,
        };
        let timeouts = crate::transport::Timeouts {
            connect: std::time::Duration::from_millis(500),
            write: std::time::Duration::from_millis(500),
            stall: false,
        };
        let entries = vec![
            Item {
                id: "1",
                key: None,
                record_key: None,
                body: b"{}",
                content_type: "application/json",
            };
            10
        ];
        let started = Instant::now();
        let (added, r) = xadd(
            &mut None,
            &stream,
            &entries,
            &timeouts,
            &crate::security::Allowlist::default(),
            &crate::transport::Uninterruptible,
        );
        let took = started.elapsed();
        assert!(
            matches!(r, Err(RedisError::Send(SendError::ReadTimeout { .. }))),
            "{r:?}"
        );
        assert!(added < 10);
        assert!(took < std::time::Duration::from_millis(1500), "{took:?}");
    }

    #[test]
    fn passwords_stay_out_of_debug_output() {
        let a = Auth {
            username: Some("u".into()),
            password: "s3cret".into(),
        };
        assert!(!format!("{a:?}").contains("s3cret"));
    }
}
